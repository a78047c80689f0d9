//! The checks made as the job's user just before a task becomes the
//! launcher: what the runtime would otherwise report as a bare exit code 255
//! (Apptainer's own failure code, which does not say what failed), each
//! with the node and the path at fault.
#![forbid(unsafe_code)]

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use crate::secure::{self, TrustError};

use super::Plan;

/// Why a task cannot run its plan on this node.
#[derive(Debug)]
pub enum CheckError {
    RuntimeNotExecutable {
        node: String,
        runtime: PathBuf,
    },
    ImageUnreadable {
        node: String,
        image: PathBuf,
        source: TrustError,
    },
    BindSource {
        node: String,
        src: PathBuf,
        dst: PathBuf,
        source: io::Error,
    },
    /// A workdir inside a bind whose directory on the host is missing.
    Workdir {
        node: String,
        workdir: PathBuf,
        on_host: PathBuf,
    },
}

impl fmt::Display for CheckError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CheckError::RuntimeNotExecutable { node, runtime } => write!(
                f,
                "node {node}: the container runtime {} is not executable here",
                runtime.display()
            ),
            CheckError::ImageUnreadable {
                node,
                image,
                source,
            } => write!(
                f,
                "node {node}: cannot read image {}: {source}; ask the admins to make it \
                 readable (chmod o+r)",
                image.display()
            ),
            CheckError::BindSource {
                node,
                src,
                dst,
                source,
            } => write!(
                f,
                "node {node}: bind source {} (for {}): {source}; create it or fix \
                 --ml-container-mounts",
                src.display(),
                dst.display()
            ),
            CheckError::Workdir {
                node,
                workdir,
                on_host,
            } => write!(
                f,
                "node {node}: --ml-container-workdir {} does not exist ({} on the host): \
                 create it or pick another directory",
                workdir.display(),
                on_host.display()
            ),
        }
    }
}

impl std::error::Error for CheckError {}

/// A regular file with an execute bit.
pub fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Checks `plan` on node `node`, run as the job's user (in the task): the
/// runtime, the image, each bind source and a workdir inside a bind.
pub fn check_as_user(plan: &Plan, node: &str) -> Result<(), CheckError> {
    if !is_executable(&plan.runtime) {
        return Err(CheckError::RuntimeNotExecutable {
            node: node.to_string(),
            runtime: plan.runtime.clone(),
        });
    }
    // The one safe open, here as the user: a path swapped for a FIFO or a
    // symlink since slurmstepd verified it fails at once instead of
    // blocking the task.
    if let Err(source) = secure::open_regular(&plan.image) {
        return Err(CheckError::ImageUnreadable {
            node: node.to_string(),
            image: plan.image.clone(),
            source,
        });
    }
    for b in &plan.binds {
        if let Err(source) = std::fs::metadata(&b.src) {
            return Err(CheckError::BindSource {
                node: node.to_string(),
                src: b.src.clone(),
                dst: b.dst.clone(),
                source,
            });
        }
    }
    if let Some(w) = &plan.workdir {
        // A workdir inside a bind can be checked on the host; one inside
        // the image only by the runtime.
        let on_host = plan
            .binds
            .iter()
            .filter_map(|b| w.strip_prefix(&b.dst).ok().map(|rest| b.src.join(rest)))
            .next_back();
        if let Some(h) = on_host {
            if !h.is_dir() {
                return Err(CheckError::Workdir {
                    node: node.to_string(),
                    workdir: w.clone(),
                    on_host: h,
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RuntimeKind;
    use crate::options::Mount;
    use std::os::unix::fs::PermissionsExt;

    struct Dir(PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A runtime (executable), an image and a bind source in a temp dir.
    fn fixture() -> (Dir, Plan) {
        let d = std::env::temp_dir().join(format!("mlc-checks-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("data/sub")).unwrap();
        let runtime = d.join("apptainer");
        std::fs::write(&runtime, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&runtime, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(d.join("img.sif"), "x").unwrap();
        let plan = Plan {
            kind: RuntimeKind::Apptainer,
            runtime,
            image: d.join("img.sif"),
            nv: false,
            binds: vec![Mount {
                src: d.join("data"),
                dst: "/data".into(),
                read_only: false,
            }],
            workdir: Some("/data/sub".into()),
            writable_tmpfs: false,
            extra_args: Vec::new(),
            quiet: true,
        };
        (Dir(d), plan)
    }

    #[test]
    fn each_check_names_the_node_and_the_path() {
        let (dir, plan) = fixture();
        check_as_user(&plan, "n1").unwrap();

        let mut p = plan.clone();
        std::fs::set_permissions(&p.runtime, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = check_as_user(&p, "n1").unwrap_err().to_string();
        assert_eq!(
            e,
            format!(
                "node n1: the container runtime {} is not executable here",
                p.runtime.display()
            )
        );
        assert!(!is_executable(&p.runtime) && !is_executable(&dir.0));
        std::fs::set_permissions(&p.runtime, std::fs::Permissions::from_mode(0o755)).unwrap();

        p.image = dir.0.join("gone.sif");
        let e = check_as_user(&p, "n1").unwrap_err().to_string();
        assert!(
            e.starts_with(&format!(
                "node n1: cannot read image {}: ",
                p.image.display()
            )) && e.ends_with("(chmod o+r)"),
            "{e}"
        );
        // A directory where the image was: refused by the safe open.
        p.image = dir.0.join("data");
        assert!(matches!(
            check_as_user(&p, "n1"),
            Err(CheckError::ImageUnreadable { .. })
        ));

        let mut p = plan.clone();
        p.binds[0].src = dir.0.join("nope");
        let e = check_as_user(&p, "n2").unwrap_err().to_string();
        assert!(
            e.starts_with(&format!(
                "node n2: bind source {} (for /data): ",
                p.binds[0].src.display()
            )) && e.ends_with("create it or fix --ml-container-mounts"),
            "{e}"
        );

        let mut p = plan.clone();
        p.workdir = Some("/data/missing".into());
        let e = check_as_user(&p, "n1").unwrap_err().to_string();
        assert!(
            e.contains(&format!(
                "--ml-container-workdir /data/missing does not exist ({} on the host)",
                dir.0.join("data/missing").display()
            )),
            "{e}"
        );
        // A workdir outside every bind is the runtime's to check.
        p.workdir = Some("/opt/in-image".into());
        check_as_user(&p, "n1").unwrap();
    }
}
