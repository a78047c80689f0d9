/* The one header bindgen reads: the SPANK API of the Slurm we build against.
 * build.rs points the include path at SLURM_INCLUDE_DIR when it is set. */
#include <slurm/spank.h>
#include <slurm/slurm_version.h>
