//! The contract with the SPANK layer: what the plugin asks of Slurm
//! ([`Host`]), how a call into Slurm fails ([`HostError`]) and where a
//! callback runs ([`Context`]). `crate::spank` implements `Host` over a
//! real `spank_t`; the unit tests implement it over plain data.
#![forbid(unsafe_code)]

use std::fmt;

use crate::options::OptionSpec;

/// spank_context_t, as far as the plugin cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Context {
    Local,
    Remote,
    Allocator,
    Slurmd,
    JobScript,
    Error,
}

impl Context {
    /// Contexts in which user options exist (spank(8): srun, sbatch/salloc,
    /// slurmstepd).
    pub fn has_options(self) -> bool {
        matches!(self, Context::Local | Context::Remote | Context::Allocator)
    }
}

/// A failed call into Slurm.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostError {
    Spank {
        call: &'static str,
        what: String,
        code: u32,
        message: String,
    },
    /// A string with an interior NUL cannot cross into C.
    Nul(String),
    /// The running Slurm lacks this call.
    Unsupported(&'static str),
}

impl fmt::Display for HostError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostError::Spank {
                call,
                what,
                code,
                message,
            } => write!(f, "{call}({what}) failed: {message} (code {code})"),
            HostError::Nul(s) => write!(f, "'{}' contains a NUL byte", s.escape_default()),
            HostError::Unsupported(call) => write!(f, "this Slurm has no {call}"),
        }
    }
}

/// The Slurm side of the plugin, reduced to what the plugin needs.
pub trait Host {
    fn context(&self) -> Context;
    /// A variable of the job's environment (in srun/sbatch: the process's).
    fn getenv(&self, name: &str) -> Option<String>;
    fn job_id(&self) -> Option<u32>;
    fn step_id(&self) -> Option<u32>;
    fn node_id(&self) -> Option<u32>;
    fn register_option(&mut self, spec: &OptionSpec) -> Result<(), HostError>;
    /// Sets (or with `None` removes) a variable in srun's own environment,
    /// which srun hands to the step's tasks.
    fn set_local_env(&mut self, name: &str, value: Option<&str>);
    /// Sets a variable in the job's (task's) environment, overwriting.
    fn set_job_env(&mut self, name: &str, value: &str) -> Result<(), HostError>;
    /// The task's argv (task context).
    fn job_argv(&self) -> Option<Vec<String>>;
    /// Replaces the task's `argv[0]` in place (task context).
    fn set_argv0(&mut self, value: &str) -> Result<(), HostError>;
    /// In task_exit: the task's wait(2) status, global and local ids.
    fn task_exit_status(&self) -> Option<i32>;
    fn task_global_id(&self) -> Option<u32>;
    fn task_local_id(&self) -> Option<u32>;
    /// Tasks of this step on this node.
    fn local_task_count(&self) -> Option<u32>;
    /// The job's uid and gid.
    fn job_ids(&self) -> Option<(u32, u32)>;
    /// On a node: whether the job was cancelled (scancel) while the plugin
    /// works, asked between chunks of long work (hashing an image); it
    /// rate-limits itself. Slurm sends slurmstepd no signal before the
    /// tasks exist, so this asks the controller. Default: never.
    fn cancelled(&self) -> bool {
        false
    }
    /// Runs `f` on a thread whose file-system identity is the job's user
    /// (fsuid, fsgid and supplementary groups), so that root in slurmstepd
    /// asks "may the user read this" as the user and learns nothing the
    /// user could not. Default (srun, tests: already the user): in place.
    fn as_job_user(&self, f: &mut (dyn FnMut() + Send)) -> Result<(), HostError> {
        f();
        Ok(())
    }
}
