//! The SPANK boundary: the only code in the crate that uses `unsafe`.
//!
//! Three parts: the raw bindings bindgen made from `slurm/spank.h` (private),
//! [`SpankHost`], the safe [`Host`] implementation over a `spank_t`, and
//! `export`, the symbols Slurm looks up in the plugin (spank(8)). Everything
//! above this layer is safe Rust and is tested without Slurm.

mod creds;
mod export;
mod logger;

use std::ffi::{c_char, c_int, CStr, CString};

use crate::options::OptionSpec;
use crate::plugin::{Context, Host, HostError};

#[allow(
    non_upper_case_globals,
    non_camel_case_types,
    non_snake_case,
    dead_code,
    clippy::all,
    clippy::undocumented_unsafe_blocks
)]
mod sys {
    include!(concat!(env!("OUT_DIR"), "/spank_bindings.rs"));
}

pub use logger::init as init_logger;

/// The Slurm release the plugin was built against (from slurm_version.h).
pub const BUILT_FOR_SLURM: &str = env!("MLC_SLURM_VERSION");

/// A SPANK handle for the duration of one callback. Slurm owns the handle;
/// it is valid until the callback returns, and `SpankHost` does not outlive it.
#[derive(Debug)]
pub struct SpankHost {
    sp: sys::spank_t,
    cancel: creds::CancelWatch,
}

/// The largest environment value read back from the job (spank_getenv needs
/// a caller-sized buffer).
const MAX_ENV_VALUE: usize = 1 << 20;

impl SpankHost {
    fn new(sp: sys::spank_t) -> SpankHost {
        SpankHost {
            sp,
            cancel: creds::CancelWatch::default(),
        }
    }

    /// S_JOB_ARGV: the count and the array itself.
    fn raw_argv(&self) -> Option<(usize, *mut *mut c_char)> {
        let mut argc: c_int = 0;
        let mut argv: *mut *mut c_char = std::ptr::null_mut();
        // SAFETY: spank.h documents S_JOB_ARGV as (int *, char ***); both
        // out-pointers are valid locals, the handle is the callback's own.
        let rc = unsafe {
            sys::spank_get_item(
                self.sp,
                sys::S_JOB_ARGV,
                &mut argc as *mut c_int,
                &mut argv as *mut *mut *mut c_char,
            )
        };
        (rc == sys::ESPANK_SUCCESS && !argv.is_null() && argc >= 0).then_some((argc as usize, argv))
    }

    fn item_i32(&self, item: sys::spank_item_t) -> Option<i32> {
        let mut v: i32 = 0;
        // SAFETY: for the int items used here (S_TASK_ID,
        // S_TASK_EXIT_STATUS) spank.h documents one `int *` argument; `v`
        // lives across the call and the handle is the callback's own.
        let rc = unsafe { sys::spank_get_item(self.sp, item, &mut v as *mut i32) };
        (rc == sys::ESPANK_SUCCESS).then_some(v)
    }

    fn item_u32(&self, item: sys::spank_item_t) -> Option<u32> {
        let mut v: u32 = 0;
        // SAFETY: for the u32 items used here (S_JOB_ID, S_JOB_STEPID,
        // S_JOB_NODEID, S_TASK_GLOBAL_ID, S_JOB_LOCAL_TASK_COUNT, and
        // S_JOB_UID/S_JOB_GID whose uid_t/gid_t are u32 on Linux) spank.h
        // documents one pointer to a 32-bit unsigned argument; `v`
        // lives across the call and the handle is the callback's own.
        let rc = unsafe { sys::spank_get_item(self.sp, item, &mut v as *mut u32) };
        (rc == sys::ESPANK_SUCCESS).then_some(v)
    }
}

impl SpankHost {
    /// S_JOB_SUPPLEMENTARY_GIDS: the job's supplementary groups, as
    /// slurmstepd resolved them (no NSS lookup here).
    fn supplementary_gids(&self) -> Option<Vec<u32>> {
        let mut gids: *mut libc::gid_t = std::ptr::null_mut();
        let mut n: c_int = 0;
        // SAFETY: spank.h documents S_JOB_SUPPLEMENTARY_GIDS as
        // (gid_t **, int *); both out-pointers are valid locals and the
        // handle is the callback's own.
        let rc = unsafe {
            sys::spank_get_item(
                self.sp,
                sys::S_JOB_SUPPLEMENTARY_GIDS,
                &mut gids as *mut *mut libc::gid_t,
                &mut n as *mut c_int,
            )
        };
        if rc != sys::ESPANK_SUCCESS || n < 0 {
            return None;
        }
        if gids.is_null() || n == 0 {
            return Some(Vec::new());
        }
        // SAFETY: Slurm returns its own array of `n` gids (the step's),
        // valid for the callback; it is copied here, never freed.
        Some(unsafe { std::slice::from_raw_parts(gids, n as usize) }.to_vec())
    }
}

fn to_cstring(s: &str) -> Result<CString, HostError> {
    CString::new(s).map_err(|_| HostError::Nul(s.to_string()))
}

impl Host for SpankHost {
    fn context(&self) -> Context {
        // SAFETY: spank_context() takes no arguments and only reads Slurm's
        // global state; callable from any callback (spank.h).
        let ctx = unsafe { sys::spank_context() };
        match ctx {
            sys::S_CTX_LOCAL => Context::Local,
            sys::S_CTX_REMOTE => Context::Remote,
            sys::S_CTX_ALLOCATOR => Context::Allocator,
            sys::S_CTX_SLURMD => Context::Slurmd,
            sys::S_CTX_JOB_SCRIPT => Context::JobScript,
            _ => Context::Error,
        }
    }

    fn getenv(&self, name: &str) -> Option<String> {
        if self.context() != Context::Remote {
            // spank_getenv() is remote-only (ESPANK_NOT_REMOTE); in srun,
            // sbatch and salloc the job environment is the process's own.
            return std::env::var(name).ok();
        }
        let cname = to_cstring(name).ok()?;
        let mut len = 4096usize;
        while len <= MAX_ENV_VALUE {
            let mut buf = vec![0u8; len];
            // SAFETY: `buf` is writable for `len` bytes (len fits c_int, at
            // most MAX_ENV_VALUE); spank_getenv NUL-terminates what it
            // writes, and `cname` is a valid C string for the call.
            let rc = unsafe {
                sys::spank_getenv(
                    self.sp,
                    cname.as_ptr(),
                    buf.as_mut_ptr().cast::<c_char>(),
                    len as c_int,
                )
            };
            match rc {
                sys::ESPANK_SUCCESS => {
                    let value = CStr::from_bytes_until_nul(&buf).ok()?;
                    return Some(value.to_string_lossy().into_owned());
                }
                sys::ESPANK_NOSPACE => len *= 4,
                _ => return None,
            }
        }
        None
    }

    fn job_id(&self) -> Option<u32> {
        self.item_u32(sys::S_JOB_ID)
    }

    fn step_id(&self) -> Option<u32> {
        self.item_u32(sys::S_JOB_STEPID)
    }

    fn node_id(&self) -> Option<u32> {
        self.item_u32(sys::S_JOB_NODEID)
    }

    fn set_local_env(&mut self, name: &str, value: Option<&str>) {
        // srun copies its own environment into the job's when it launches
        // the step, after init_post_opt; this is how the local context
        // passes data to the nodes. Edition 2021 set_var: srun has not
        // started its I/O and signal threads yet at this point.
        match value {
            Some(v) => std::env::set_var(name, v),
            None => std::env::remove_var(name),
        }
    }

    fn task_exit_status(&self) -> Option<i32> {
        self.item_i32(sys::S_TASK_EXIT_STATUS)
    }

    fn task_global_id(&self) -> Option<u32> {
        self.item_u32(sys::S_TASK_GLOBAL_ID)
    }

    fn task_local_id(&self) -> Option<u32> {
        self.item_i32(sys::S_TASK_ID)
            .and_then(|v| u32::try_from(v).ok())
    }

    fn local_task_count(&self) -> Option<u32> {
        self.item_u32(sys::S_JOB_LOCAL_TASK_COUNT)
    }

    fn job_ids(&self) -> Option<(u32, u32)> {
        // uid_t and gid_t are 32-bit unsigned on Linux.
        Some((
            self.item_u32(sys::S_JOB_UID)?,
            self.item_u32(sys::S_JOB_GID)?,
        ))
    }

    fn job_argv(&self) -> Option<Vec<String>> {
        let (argc, argv) = self.raw_argv()?;
        (0..argc)
            .map(|i| {
                // SAFETY: i < argc, and Slurm's task argv holds argc valid
                // entries (spank.h S_JOB_ARGV: int *, char ***).
                let p = unsafe { *argv.add(i) };
                // SAFETY: each entry is a NUL-terminated string owned by
                // slurmstepd for the life of the task.
                (!p.is_null()).then(|| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
            })
            .collect()
    }

    fn set_argv0(&mut self, value: &str) -> Result<(), HostError> {
        let (argc, argv) = self
            .raw_argv()
            .ok_or(HostError::Unsupported("S_JOB_ARGV"))?;
        if argc == 0 {
            return Err(HostError::Unsupported("an empty task argv"));
        }
        let leaked = to_cstring(value)?.into_raw();
        // SAFETY: argv has at least one entry (argc > 0); in task context
        // this is the task's own argv array, in this forked process, which
        // slurmstepd execs right after task_init. Replacing one pointer does
        // not grow the array; the old string stays Slurm's to free, the new
        // one is deliberately leaked (it must outlive the exec call).
        unsafe { *argv = leaked };
        Ok(())
    }

    fn set_job_env(&mut self, name: &str, value: &str) -> Result<(), HostError> {
        let cname = to_cstring(name)?;
        let cvalue = to_cstring(value)?;
        // SAFETY: both are valid C strings for the duration of the call;
        // spank_setenv copies them into the job environment (spank.h).
        let rc = unsafe { sys::spank_setenv(self.sp, cname.as_ptr(), cvalue.as_ptr(), 1) };
        if rc == sys::ESPANK_SUCCESS {
            Ok(())
        } else {
            Err(HostError::Spank {
                call: "spank_setenv",
                what: name.to_string(),
                code: rc,
                message: strerror(rc),
            })
        }
    }

    fn cancelled(&self) -> bool {
        self.context() == Context::Remote && self.cancel.cancelled(self.job_id())
    }

    fn as_job_user(&self, f: &mut (dyn FnMut() + Send)) -> Result<(), HostError> {
        let fail = |message: String| HostError::Spank {
            call: "as_job_user",
            what: "the job's uid, gid and groups".to_string(),
            code: 0,
            message,
        };
        let (uid, gid) = self
            .job_ids()
            .ok_or_else(|| fail("Slurm gave no uid/gid".to_string()))?;
        let groups = self
            .supplementary_gids()
            .ok_or_else(|| fail("Slurm gave no supplementary groups".to_string()))?;
        creds::on_user_thread(uid, gid, &groups, f).map_err(|e| fail(e.to_string()))
    }

    fn register_option(&mut self, spec: &OptionSpec) -> Result<(), HostError> {
        let name = to_cstring(spec.name)?;
        let usage = to_cstring(spec.usage)?;
        let arginfo = spec.arginfo.map(to_cstring).transpose()?;
        let mut opt = sys::spank_option {
            name: name.as_ptr().cast_mut(),
            arginfo: arginfo
                .as_ref()
                .map_or(std::ptr::null_mut(), |a| a.as_ptr().cast_mut()),
            usage: usage.as_ptr().cast_mut(),
            has_arg: c_int::from(spec.arginfo.is_some()),
            val: spec.id as c_int,
            cb: Some(export::option_callback),
        };
        // SAFETY: every pointer in `opt` is valid for the call; Slurm copies
        // the struct and its strings (_spank_option_copy in plugstack.c), so
        // they need not outlive it. The handle is the callback's own.
        let rc = unsafe { sys::spank_option_register(self.sp, &mut opt) };
        if rc == sys::ESPANK_SUCCESS {
            Ok(())
        } else {
            Err(HostError::Spank {
                call: "spank_option_register",
                what: spec.name.to_string(),
                code: rc,
                message: strerror(rc),
            })
        }
    }
}

fn strerror(rc: sys::spank_err_t) -> String {
    // SAFETY: spank_strerror returns a pointer to a static string (or NULL),
    // never freed by the caller.
    let p = unsafe { sys::spank_strerror(rc) };
    if p.is_null() {
        return format!("error {rc}");
    }
    // SAFETY: non-NULL, NUL-terminated, static (see above).
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}
