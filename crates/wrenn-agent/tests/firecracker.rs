//! VM capsules on Firecracker: create, exec, pause (snapshot to a file,
//! VMM gone), resume, destroy. Firecracker needs KVM that can run a guest
//! and an uncompressed kernel; where either is missing (these development
//! machines: no `firecracker` binary in any registry, a `/dev/kvm` that
//! cannot boot a guest), the test says why and passes without running.
//! Set `WRENN_FIRECRACKER` (binary) and `WRENN_FIRECRACKER_KERNEL`
//! (a `vmlinux`) on a KVM host to run it.

mod common;

use common::TestAgent;
use wrenn_agent::config::FirecrackerConfig;
use wrenn_agent::runtime::vm::firecracker::FirecrackerRuntime;
use wrenn_agent::state::CapsuleState;
use wrenn_agent::template::Engine;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn firecracker_vm_lifecycle() {
    let binary = std::env::var("WRENN_FIRECRACKER").unwrap_or_else(|_| "firecracker".into());
    if let Some(why) = FirecrackerRuntime::unavailable(&binary) {
        eprintln!("SKIPPED firecracker_vm_lifecycle: {why}");
        return;
    }
    let Some(vmlinux) = std::env::var_os("WRENN_FIRECRACKER_KERNEL") else {
        eprintln!(
            "SKIPPED firecracker_vm_lifecycle: WRENN_FIRECRACKER_KERNEL (a vmlinux) is not set"
        );
        return;
    };
    let kernel = common::vm_kernel_dir();
    let mut t = TestAgent::start_with(|c| {
        c.vm.kernel_dir = kernel;
        c.vm.firecracker = Some(FirecrackerConfig {
            binary,
            vmlinux: vmlinux.into(),
        });
    })
    .await;
    t.engine = Some(Engine::Vm);
    let id = t.capsule().await;
    assert_eq!(t.agent.info_of(&id).unwrap().runtime, "firecracker");
    let (code, out) = t
        .sh(
            &id,
            "cat /proc/1/cmdline | tr '\\0' ' '; echo x > /root/kept",
        )
        .await;
    assert_eq!(code, 0, "{out}");
    assert!(out.starts_with("/.wrenn/envd"), "{out}");
    t.agent.pause(&id).await.unwrap();
    assert_eq!(t.agent.info_of(&id).unwrap().state, CapsuleState::Paused);
    t.agent.resume(&id).await.unwrap();
    assert_eq!(t.sh(&id, "cat /root/kept").await, (0, "x\n".to_string()));
    t.agent.destroy(&id).await.unwrap();
    let left = t.leftovers();
    assert!(left.is_empty(), "left behind: {left:#?}");
}
