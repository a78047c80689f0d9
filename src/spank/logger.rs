//! `log` records into Slurm's own log functions, so plugin lines land where
//! the rest of srun's or slurmstepd's output goes (spank(8): "slurm_info,
//! slurm_error ... should be used by plugins"). Every line starts with
//! `ml-container: `.

use std::ffi::CString;

use super::sys;

struct SlurmLogger;

static LOGGER: SlurmLogger = SlurmLogger;

/// Installs the logger once per process; later calls are no-ops.
pub fn init() {
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(log::LevelFilter::Debug);
    }
}

/// The message as a C string, one line: messages carry job strings (image
/// names, paths, option values), so every control character is escaped
/// (a NUL, which C would truncate at, included) and the line is capped
/// (a newline from the job never forges a log line).
fn line(msg: &str) -> CString {
    let text = crate::jobtext::escape(&format!("ml-container: {msg}"), crate::jobtext::LINE_CAP);
    CString::new(text).unwrap_or_default()
}

impl log::Log for SlurmLogger {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let text = match record.level() {
            log::Level::Warn => line(&format!("warning: {}", record.args())),
            _ => line(&record.args().to_string()),
        };
        let fmt = c"%s";
        // SAFETY: the format is a constant "%s" consuming exactly the one
        // NUL-terminated string passed, which lives across the call. These
        // functions are exported by every Slurm program that loads plugins.
        unsafe {
            match record.level() {
                log::Level::Error => sys::slurm_error(fmt.as_ptr(), text.as_ptr()),
                log::Level::Warn | log::Level::Info => sys::slurm_info(fmt.as_ptr(), text.as_ptr()),
                log::Level::Debug => sys::slurm_verbose(fmt.as_ptr(), text.as_ptr()),
                log::Level::Trace => sys::slurm_debug(fmt.as_ptr(), text.as_ptr()),
            }
        }
    }

    fn flush(&self) {}
}
