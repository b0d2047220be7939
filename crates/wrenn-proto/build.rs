//! Compiles `proto/` with `protox` (pure Rust, no `protoc` needed) and hands
//! the descriptor set to `connectrpc-build`, which emits buffa message types
//! and Connect service stubs into `OUT_DIR`.

use std::path::PathBuf;

use prost::Message;

const FILES: &[&str] = &[
    "envd/process.proto",
    "envd/filesystem.proto",
    "agent/agent.proto",
];

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    for f in FILES {
        println!("cargo:rerun-if-changed={}", root.join(f).display());
    }
    println!("cargo:rerun-if-changed=build.rs");
    let fds = protox::compile(FILES, [&root]).expect("proto/ compiles");
    let set = out.join("wrenn_descriptor_set.bin");
    let bytes = fds.encode_to_vec();
    // Rewrite only on change: the set is an input of the step below, and a
    // fresh mtime would make every build regenerate (and recompile) it.
    if std::fs::read(&set).ok().as_deref() != Some(&bytes[..]) {
        std::fs::write(&set, &bytes).expect("write descriptor set");
    }
    connectrpc_build::Config::new()
        .files(FILES)
        .descriptor_set(&set)
        .emit_rerun_directives(false)
        .include_file("_connectrpc.rs")
        .compile()
        .expect("connectrpc-build generates code");
}
