//! The symbols Slurm's plugin loader and plugstack look up (spank(8)).
//!
//! Only the callbacks the plugin uses are exported: Slurm calls whatever it
//! finds, and exporting `slurm_spank_job_prolog`/`_epilog` would make slurmd
//! spawn extra processes for every job. No symbol is named `init` or `fini`
//! (Slurm's generic plugin loader would call them).
//!
//! Every callback runs inside [`guard`]: a panic that crossed the `extern "C"`
//! boundary would abort srun or slurmstepd, so it is caught, logged and turned
//! into -1, which every Slurm release treats as failure (before 25.05 the
//! test is `< 0`).

use std::ffi::{c_char, c_int, c_uint, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Instant;

use super::{sys, SpankHost};
use crate::plugin::{self, PluginError};

/// `const char plugin_name[]` (spank.h SPANK_PLUGIN macro): an array, not a pointer.
#[no_mangle]
#[used]
pub static plugin_name: [u8; 13] = *b"ml-container\0";

#[no_mangle]
#[used]
pub static plugin_type: [u8; 6] = *b"spank\0";

/// Must equal the loading Slurm's major.minor, or Slurm refuses the plugin.
#[no_mangle]
#[used]
pub static plugin_version: c_uint = sys::SLURM_VERSION_NUMBER;

/// Runs one callback body: its error or its panic becomes a logged line and
/// -1; nothing unwinds into C. The callback's own time is logged at debug
/// level, which is Slurm's "verbose" (SlurmdDebug=verbose shows it in the
/// slurmd log), so a site can see what the plugin adds to a launch.
fn guard(callback: &'static str, body: impl FnOnce() -> Result<(), PluginError>) -> c_int {
    let started = Instant::now();
    let outcome = catch_unwind(AssertUnwindSafe(body));
    // Logging is guarded too: a panic while reporting must not escape either.
    let rc = catch_unwind(AssertUnwindSafe(|| match outcome {
        Ok(Ok(())) => 0,
        Ok(Err(e)) => {
            log::error!("{e}");
            -1
        }
        Err(payload) => {
            let what = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".to_string());
            log::error!(
                "internal error in {callback} ({what}); the step is stopped, the daemons are \
                 unaffected. Please report this with the slurmd log."
            );
            -1
        }
    }));
    let _ = catch_unwind(|| log::debug!("{callback} took {} us", started.elapsed().as_micros()));
    rc.unwrap_or(-1)
}

/// The plugstack.conf arguments as Rust strings.
///
/// # Safety
/// `av` must point to `ac` valid C strings (or be NULL with `ac` 0), as
/// Slurm passes them to every callback.
unsafe fn plugstack_args(ac: c_int, av: *mut *mut c_char) -> Vec<String> {
    if av.is_null() || ac <= 0 {
        return Vec::new();
    }
    (0..ac as usize)
        .filter_map(|i| {
            // SAFETY: i < ac, and the caller guarantees `av` has ac entries.
            let p = unsafe { *av.add(i) };
            // SAFETY: each non-NULL entry is a NUL-terminated string owned by
            // Slurm for the duration of the callback.
            (!p.is_null()).then(|| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
        })
        .collect()
}

/// spank(8): called just after the plugin is loaded, in every context.
#[no_mangle]
pub extern "C" fn slurm_spank_init(sp: sys::spank_t, ac: c_int, av: *mut *mut c_char) -> c_int {
    guard("slurm_spank_init", || {
        super::init_logger();
        install_panic_hook();
        // SAFETY: Slurm passes the plugstack arguments as (ac, av).
        let args = unsafe { plugstack_args(ac, av) };
        plugin::init(&mut SpankHost::new(sp), &args)
    })
}

/// spank(8): called after options are processed, in every context.
#[no_mangle]
pub extern "C" fn slurm_spank_init_post_opt(
    sp: sys::spank_t,
    _ac: c_int,
    _av: *mut *mut c_char,
) -> c_int {
    guard("slurm_spank_init_post_opt", || {
        plugin::init_post_opt(&mut SpankHost::new(sp))
    })
}

/// spank(8): called in each task just before it execs, as the job's user.
#[no_mangle]
pub extern "C" fn slurm_spank_task_init(
    sp: sys::spank_t,
    _ac: c_int,
    _av: *mut *mut c_char,
) -> c_int {
    guard("slurm_spank_task_init", || {
        plugin::task_init(&mut SpankHost::new(sp))
    })
}

/// spank(8): called in slurmstepd, as root, after each task is forked
/// (the task's start time for the failure report).
#[no_mangle]
pub extern "C" fn slurm_spank_task_post_fork(
    sp: sys::spank_t,
    _ac: c_int,
    _av: *mut *mut c_char,
) -> c_int {
    guard("slurm_spank_task_post_fork", || {
        plugin::task_post_fork(&mut SpankHost::new(sp))
    })
}

/// spank(8): called in slurmstepd, as root, after each task exits.
#[no_mangle]
pub extern "C" fn slurm_spank_task_exit(
    sp: sys::spank_t,
    _ac: c_int,
    _av: *mut *mut c_char,
) -> c_int {
    guard("slurm_spank_task_exit", || {
        plugin::task_exit(&mut SpankHost::new(sp))
    })
}

/// The callback of every registered option (`spank_opt_cb_f`): `val` tells
/// which option, `remote` whether this is slurmstepd.
pub(super) extern "C" fn option_callback(
    val: c_int,
    optarg: *const c_char,
    remote: c_int,
) -> c_int {
    guard("option callback", || {
        let arg = if optarg.is_null() {
            None
        } else {
            // SAFETY: a non-NULL optarg is the NUL-terminated option value,
            // valid for the duration of the callback.
            Some(
                unsafe { CStr::from_ptr(optarg) }
                    .to_string_lossy()
                    .into_owned(),
            )
        };
        plugin::on_option(val, arg.as_deref(), remote != 0)
    })
}

/// The default hook prints to stderr, which in slurmstepd goes nowhere;
/// send the panic's message and location to Slurm's log instead. The hook
/// belongs to this plugin's own copy of the Rust runtime only.
fn install_panic_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        std::panic::set_hook(Box::new(|info| {
            log::error!("panic: {info}");
        }));
    });
}
