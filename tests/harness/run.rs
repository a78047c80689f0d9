//! One command's result (and one running in the background), with helpers
//! that print everything on failure.

use std::process::{Child, Output};

/// One command's result, with helpers that print everything on failure.
#[derive(Debug)]
pub struct Run {
    pub argv: Vec<String>,
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub(super) fn from_output(argv: Vec<String>, out: Output) -> Run {
        use std::os::unix::process::ExitStatusExt;
        Run {
            argv,
            code: out.status.code(),
            signal: out.status.signal(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    pub fn ok(&self) -> bool {
        self.code == Some(0)
    }

    #[track_caller]
    pub fn assert_ok(&self) -> &Run {
        assert!(self.ok(), "command failed: {self}");
        self
    }

    #[track_caller]
    pub fn assert_failed(&self) -> &Run {
        assert!(
            !self.ok(),
            "command succeeded but should have failed: {self}"
        );
        self
    }
}

impl std::fmt::Display for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:?}\n  exit code {:?}, signal {:?}\n  stdout:\n{}\n  stderr:\n{}",
            self.argv, self.code, self.signal, self.stdout, self.stderr
        )
    }
}

/// A command running in the background.
pub struct Background {
    pub(super) child: Child,
    pub(super) argv: Vec<String>,
}

impl Background {
    pub fn wait(self) -> Run {
        let out = self
            .child
            .wait_with_output()
            .expect("wait for background command");
        Run::from_output(self.argv, out)
    }
}
