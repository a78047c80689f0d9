//! The real-cluster scenarios, one module per part of the product
//! (foundation, registry, distributed environment, execution, failure
//! capture, security, releases, PyTorch, scale, ...).

pub mod distributed;
pub mod execution;
pub mod failure;
pub mod foundation;
pub mod package;
pub mod prometheus;
pub mod pytorch;
pub mod registry;
pub mod releases;
pub mod rough_edges;
pub mod scale;
pub mod security;
pub mod security_outputs;
pub mod share;

/// Instantiates scenarios for every supported Slurm release.
#[macro_export]
macro_rules! on_every_slurm {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                use super::*;
                #[test]
                fn slurm_22_05() {
                    super::$name(Slurm::V22_05)
                }
                #[test]
                fn slurm_24_11() {
                    super::$name(Slurm::V24_11)
                }
                #[test]
                fn slurm_26_05() {
                    super::$name(Slurm::V26_05)
                }
            }
        )*
    };
}

/// Instantiates scenarios for the releases with Apptainer (24.11, 26.05):
/// each module's representative scenarios, so that a release's differences
/// show without running every scenario twice (CI time).
#[macro_export]
macro_rules! on_apptainer_slurms {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                use super::*;
                #[test]
                fn slurm_24_11() {
                    super::$name(Slurm::V24_11)
                }
                #[test]
                fn slurm_26_05() {
                    super::$name(Slurm::V26_05)
                }
            }
        )*
    };
}

/// Instantiates scenarios for Slurm 24.11 only (they need Apptainer).
#[macro_export]
macro_rules! on_slurm_24_11 {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[test]
                fn slurm_24_11() {
                    super::$name()
                }
            }
        )*
    };
}
