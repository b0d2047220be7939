//! Write the compiled `FileDescriptorSet` of `proto/` to stdout (wire format),
//! for tools and tests outside Rust (the e2b descriptor comparison).

use std::io::Write;

fn main() -> std::io::Result<()> {
    std::io::stdout().write_all(wrenn_proto::FILE_DESCRIPTOR_SET)
}
