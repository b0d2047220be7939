//! PID-1 duties: mount what a bare rootfs lacks, and turn SIGTERM into an
//! orderly shutdown that passes the signal on to every process.
//! (Zombie reaping is [`crate::reaper`]'s job.)

use std::ffi::CStr;
use std::path::Path;

use wrenn_types::envd::ENVD_PRIORITY_BOOST;

struct MountSpec {
    target: &'static CStr,
    fstype: &'static CStr,
    data: Option<&'static CStr>,
    flags: libc::c_ulong,
    /// Present when this exists already.
    present_if: &'static str,
}

const MOUNTS: &[MountSpec] = &[
    MountSpec {
        target: c"/proc",
        fstype: c"proc",
        data: None,
        flags: libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        present_if: "/proc/self",
    },
    MountSpec {
        target: c"/sys",
        fstype: c"sysfs",
        data: None,
        flags: libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC | libc::MS_RDONLY,
        present_if: "/sys/kernel",
    },
    MountSpec {
        target: c"/dev",
        fstype: c"devtmpfs",
        data: None,
        flags: libc::MS_NOSUID,
        present_if: "/dev/null",
    },
    MountSpec {
        target: c"/dev/pts",
        fstype: c"devpts",
        data: Some(c"newinstance,ptmxmode=0666,mode=0620,gid=5"),
        flags: libc::MS_NOSUID | libc::MS_NOEXEC,
        present_if: "/dev/pts/ptmx",
    },
    MountSpec {
        target: c"/dev/shm",
        fstype: c"tmpfs",
        data: Some(c"mode=1777"),
        flags: libc::MS_NOSUID | libc::MS_NODEV,
        present_if: "/dev/shm/.",
    },
    MountSpec {
        target: c"/tmp",
        fstype: c"tmpfs",
        data: Some(c"mode=1777"),
        flags: libc::MS_NOSUID | libc::MS_NODEV,
        present_if: "/tmp/.",
    },
    MountSpec {
        target: c"/run",
        fstype: c"tmpfs",
        data: Some(c"mode=0755"),
        flags: libc::MS_NOSUID | libc::MS_NODEV,
        present_if: "/run/.",
    },
];

/// Mount each of [`MOUNTS`] that is missing. Failures are logged, not fatal:
/// envd still serves what it can.
pub fn prepare_rootfs() {
    for m in MOUNTS {
        if Path::new(m.present_if).exists() {
            continue;
        }
        let target = Path::new(m.target.to_str().unwrap_or("/"));
        let _ = std::fs::create_dir_all(target);
        // SAFETY: all pointers are valid NUL-terminated strings or null.
        let rc = unsafe {
            libc::mount(
                m.fstype.as_ptr(),
                m.target.as_ptr(),
                m.fstype.as_ptr(),
                m.flags,
                m.data.map_or(std::ptr::null(), |d| d.as_ptr().cast()),
            )
        };
        if rc < 0 {
            eprintln!(
                "envd: mount {}: {}",
                target.display(),
                std::io::Error::last_os_error()
            );
        }
    }
    if !Path::new("/dev/ptmx").exists() && Path::new("/dev/pts/ptmx").exists() {
        let _ = std::os::unix::fs::symlink("pts/ptmx", "/dev/ptmx");
    }
}

/// Raise the soft open-files limit to the hard one: every process, pipe,
/// PTY, watch and connection costs envd descriptors, and PID 1 starts with
/// the kernel's default soft limit of 1024.
pub fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// Lower envd's nice value by [`ENVD_PRIORITY_BOOST`] where it may (with
/// `CAP_SYS_NICE`: in a VM; in a container the agent does it from
/// outside), so that its answers do not queue behind a workload that keeps
/// the CPUs busy. It sets the calling thread's value, which threads started
/// later inherit.
pub fn raise_priority() {
    let nice = (wrenn_http::thread_nice(0) - ENVD_PRIORITY_BOOST).max(-20);
    // SAFETY: a plain syscall on the calling thread (who = 0).
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) } < 0 {
        let err = std::io::Error::last_os_error();
        tracing::debug!(%err, "envd keeps its nice value");
    }
}

/// Resolves on SIGTERM or SIGINT. As PID 1, SIGTERM is first passed on to
/// every other process in the capsule.
pub async fn shutdown_signal(pid1: bool) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    if pid1 {
        // SAFETY: kill(-1) signals every process we may signal, except us.
        unsafe { libc::kill(-1, libc::SIGTERM) };
    }
}
