//! The acceptance scenarios, one module per issue.

pub mod distributed;
pub mod execution;
pub mod failure;
pub mod foundation;
pub mod package;
pub mod prometheus;
pub mod registry;
pub mod rough_edges;
pub mod security_outputs;

/// Instantiates scenarios for both Slurm releases.
#[macro_export]
macro_rules! on_both_slurms {
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
