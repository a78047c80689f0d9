//! slurm-ml-container: containerized distributed training on Slurm.
//!
//! Data flows srun option -> resolved image -> per-task plan -> argv/env ->
//! report. The crate is three things at once:
//! - the SPANK plugin (this crate built as a cdylib, installed as
//!   `spank_ml_container.so`); its C boundary is [`spank`], the only module
//!   with `unsafe`;
//! - the support library: the pure modules below, shared with
//! - the admin CLI, `ml-container` (src/bin).
//!
//! `unsafe` is denied for the whole crate and allowed on [`spank`] alone, so
//! a new module cannot forget to forbid it.
#![deny(unsafe_code)]

pub mod capture;
pub mod catalog;
pub mod catalog_index;
pub mod catalog_write;
pub mod config;
pub mod distenv;
pub mod handoff;
pub mod hostlist;
pub mod integrity;
pub mod jobtext;
pub mod launch;
pub mod node_cache;
pub mod options;
pub mod plugin;
pub mod probe;
pub mod prom;
pub mod recipe;
pub mod registry;
pub mod report;
pub mod secure;
pub mod share;
pub mod sif;
#[allow(unsafe_code)]
pub mod spank;
pub mod squashfs;
pub mod tomlpos;
