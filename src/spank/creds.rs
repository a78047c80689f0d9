//! Two things root in slurmstepd needs from below the safe layer: acting
//! as the job's user on one thread (so root asks "may the user read this"
//! as the user), and noticing that the job was cancelled while the plugin
//! works (Slurm signals a step's tasks, not slurmstepd, and before the
//! tasks exist nothing reaches the plugin at all).

use std::ffi::{c_int, c_void};
use std::io;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use nix::unistd::{setfsgid, setfsuid, Gid, Uid};

/// Runs `f` on a new thread whose file-system identity is `uid`, `gid` and
/// `groups`. Linux keeps credentials per thread; the raw `setgroups`
/// system call changes only the calling thread (glibc's wrapper would change
/// every thread of slurmstepd), and `setfsuid` away from 0 drops the
/// thread's file capabilities (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, ...),
/// so the kernel answers as it would answer the user. The thread ends
/// with `f`: no identity has to be restored on any thread of slurmstepd.
pub(super) fn on_user_thread(
    uid: u32,
    gid: u32,
    groups: &[u32],
    f: &mut (dyn FnMut() + Send),
) -> io::Result<()> {
    std::thread::scope(|scope| {
        scope
            .spawn(move || -> io::Result<()> {
                // SAFETY: SYS_setgroups takes (size_t count, const gid_t
                // *list); `groups` is a live slice of `count` u32 (gid_t on
                // Linux) for the call, and the kernel copies it.
                let rc =
                    unsafe { libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) };
                if rc != 0 {
                    return Err(io::Error::last_os_error());
                }
                setfsgid(Gid::from_raw(gid));
                setfsuid(Uid::from_raw(uid));
                // setfsuid/setfsgid report the previous value and no error:
                // setting the same value again tells whether it took.
                if setfsgid(Gid::from_raw(gid)).as_raw() != gid
                    || setfsuid(Uid::from_raw(uid)).as_raw() != uid
                {
                    return Err(io::Error::other("setfsuid/setfsgid did not take"));
                }
                f();
                Ok(())
            })
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("the thread acting as the user panicked")))
    })
}

/// `int slurm_job_node_ready(uint32_t job_id)` (slurm.h): bit 1
/// (READY_JOB_STATE) is set while the job runs; -2 (READY_JOB_FATAL) when
/// the controller no longer knows it; -1 on a transient error.
type NodeReady = unsafe extern "C" fn(u32) -> c_int;

const READY_JOB_STATE: c_int = 1 << 1;
const READY_JOB_FATAL: c_int = -2;

/// Looked up at run time, not linked: a process that loads the plugin
/// without libslurm's API (a stand-in for slurmstepd in tests) then simply
/// never notices a cancellation, instead of failing to load.
fn node_ready_fn() -> Option<NodeReady> {
    static FN: OnceLock<Option<usize>> = OnceLock::new();
    let addr = (*FN.get_or_init(|| {
        let name = c"slurm_job_node_ready";
        // SAFETY: RTLD_DEFAULT searches the global scope of this process;
        // `name` is a valid NUL-terminated string; dlsym only reads it.
        let p: *mut c_void = unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) };
        (!p.is_null()).then_some(p as usize)
    }))?;
    // SAFETY: the symbol is Slurm's own slurm_job_node_ready, whose C
    // signature (uint32_t) -> int is NodeReady's; it lives as long as the
    // process (libslurmfull is never unloaded).
    Some(unsafe { std::mem::transmute::<usize, NodeReady>(addr) })
}

/// How often the controller is asked while the plugin works.
const POLL: Duration = Duration::from_secs(1);

/// Remembers when the controller was last asked and what it said.
#[derive(Debug, Default)]
pub(super) struct CancelWatch {
    last: std::cell::Cell<Option<Instant>>,
    cancelled: std::cell::Cell<bool>,
}

impl CancelWatch {
    /// Whether `job_id` was cancelled, asking the controller at most once
    /// per second (a transient error counts as "not cancelled": the hash
    /// is still bounded by the catalog's size).
    pub(super) fn cancelled(&self, job_id: Option<u32>) -> bool {
        if self.cancelled.get() {
            return true;
        }
        let (Some(job_id), Some(ready)) = (job_id, node_ready_fn()) else {
            return false;
        };
        if self.last.get().is_some_and(|t| t.elapsed() < POLL) {
            return false;
        }
        // SAFETY: a plain function of one integer; Slurm's API is usable in
        // slurmstepd (it talks to the controller itself), and the call is
        // bounded by Slurm's MessageTimeout.
        let rc = unsafe { ready(job_id) };
        self.last.set(Some(Instant::now()));
        let gone = rc == READY_JOB_FATAL || (rc >= 0 && rc & READY_JOB_STATE == 0);
        if gone {
            log::info!("job {job_id} is no longer running (slurm_job_node_ready = {rc})");
        }
        self.cancelled.set(gone);
        gone
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn groups_line() -> String {
        std::fs::read_to_string("/proc/self/status")
            .unwrap()
            .lines()
            .find(|l| l.starts_with("Groups:"))
            .unwrap_or_default()
            .to_string()
    }

    /// The kernel answers the thread as it would answer the user, groups
    /// included, and no other thread's identity changes.
    #[test]
    fn a_user_thread_sees_what_the_user_sees_and_nothing_leaks_back() {
        if !nix::unistd::geteuid().is_root() {
            return;
        }
        let dir = std::env::temp_dir().join(format!("mlc-creds-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let secret = dir.join("secret");
        std::fs::write(&secret, "x").unwrap();
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
        let shared = dir.join("shared");
        std::fs::write(&shared, "x").unwrap();
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o640)).unwrap();
        std::os::unix::fs::chown(&shared, Some(0), Some(4242)).unwrap();
        let before = groups_line();

        let open_as = |groups: &[u32], path: &std::path::Path| {
            let mut out = None;
            on_user_thread(65534, 65534, groups, &mut || {
                out = Some(std::fs::File::open(path).map(drop));
            })
            .unwrap();
            out.unwrap()
        };
        let e = open_as(&[], &secret).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied);
        assert!(open_as(&[], &shared).is_err());
        open_as(&[4242], &shared).unwrap();

        // This thread and the process are still root with their groups.
        std::fs::File::open(&secret).unwrap();
        assert_eq!(groups_line(), before);
        assert_eq!(setfsuid(Uid::from_raw(0)).as_raw(), 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
