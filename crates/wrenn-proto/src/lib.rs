//! Generated protocol code for every `.proto` under the repository's `proto/`.
//!
//! Nothing outside this crate should name `buffa` or `connectrpc` types for
//! messages directly; they come through here so the codegen stack can change
//! in one place.

#![allow(clippy::all, missing_docs, unreachable_pub)]

connectrpc::include_generated!();

/// The serialized `FileDescriptorSet` of `proto/` (wire format), as compiled by
/// `protox`. Tests compare it against the descriptors the E2B SDK ships.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/wrenn_descriptor_set.bin"));
