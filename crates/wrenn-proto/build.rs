//! Compiles `proto/` with `protox` (pure Rust, no `protoc` needed) and hands
//! the descriptor set to `connectrpc-build`, which emits buffa message types
//! and Connect service stubs into `OUT_DIR`.

use std::path::PathBuf;

use prost::Message;

const FILES: &[&str] = &["envd/process.proto", "envd/filesystem.proto"];

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    for f in FILES {
        println!("cargo:rerun-if-changed={}", root.join(f).display());
    }
    let fds = protox::compile(FILES, [&root]).expect("proto/ compiles");
    let set = out.join("wrenn_descriptor_set.bin");
    std::fs::write(&set, fds.encode_to_vec()).expect("write descriptor set");
    connectrpc_build::Config::new()
        .files(FILES)
        .descriptor_set(&set)
        .include_file("_connectrpc.rs")
        .compile()
        .expect("connectrpc-build generates code");
}
