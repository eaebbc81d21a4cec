//! Sizing policy for runtimes: how many vCPUs and how much memory a sandbox needs for its
//! containers. Pure functions.
//!
//! vCPUs stay fractional until the last step: `ceil(overhead + Σ limits)`, so 0.5 + 0.25 gives 1,
//! not 2. Memory is `overhead + Σ limits` rounded up to the guest's memory block size. Both are
//! clamped below by the boot size and checked against the maxima.

use thiserror::Error;

/// Why a sizing request cannot be met.
#[derive(Debug, Error, PartialEq)]
pub enum SizingError {
    /// A CPU limit is negative, NaN or infinite.
    #[error("containers[{index}].cpu_limit: {value} is not a finite, non-negative number")]
    BadCpuLimit {
        /// Index of the container.
        index: usize,
        /// The value.
        value: f64,
    },
    /// The overhead is negative, NaN or infinite.
    #[error("vmm_overhead_vcpus: {0} is not a finite, non-negative number")]
    BadOverhead(f64),
    /// More vCPUs than the VM may have.
    #[error("the containers need {needed} vCPUs but the VM allows at most {max}")]
    TooManyVcpus {
        /// vCPUs needed.
        needed: u64,
        /// The VM's maximum.
        max: u32,
    },
    /// More memory than the VM may have.
    #[error("the containers need {needed_mib} MiB but the VM allows at most {max_mib} MiB")]
    TooMuchMemory {
        /// MiB needed (rounded to blocks).
        needed_mib: u64,
        /// The VM's maximum.
        max_mib: u64,
    },
    /// Block size must be a nonzero number of MiB.
    #[error("block_size_mib must be nonzero")]
    ZeroBlockSize,
}

/// vCPUs for a sandbox: `ceil(overhead + Σ limits)`, at least `min_vcpus` (the boot count),
/// at most `max_vcpus`.
pub fn vcpus_for(
    overhead: f64,
    cpu_limits: &[f64],
    min_vcpus: u32,
    max_vcpus: u32,
) -> Result<u32, SizingError> {
    if !overhead.is_finite() || overhead < 0.0 {
        return Err(SizingError::BadOverhead(overhead));
    }
    let mut sum = overhead;
    for (index, &value) in cpu_limits.iter().enumerate() {
        if !value.is_finite() || value < 0.0 {
            return Err(SizingError::BadCpuLimit { index, value });
        }
        sum += value;
    }
    // Guard against 1.0000000000000002 from float sums of "exact" decimal inputs.
    // Finite and non-negative (checked above); `as` saturates at u64::MAX, which the limit
    // check below refuses.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let needed = ((sum - 1e-9).ceil().max(0.0)) as u64;
    let needed = needed.max(u64::from(min_vcpus));
    if needed > u64::from(max_vcpus) {
        return Err(SizingError::TooManyVcpus {
            needed,
            max: max_vcpus,
        });
    }
    u32::try_from(needed).map_err(|_| SizingError::TooManyVcpus {
        needed,
        max: max_vcpus,
    })
}

/// Memory for a sandbox in MiB: `overhead + Σ limits`, rounded up to `block_size_mib`, at least
/// `boot_mib`, at most `max_mib`.
pub fn memory_for(
    overhead_mib: u64,
    limits_mib: &[u64],
    block_size_mib: u64,
    boot_mib: u64,
    max_mib: u64,
) -> Result<u64, SizingError> {
    if block_size_mib == 0 {
        return Err(SizingError::ZeroBlockSize);
    }
    let sum = limits_mib
        .iter()
        .fold(overhead_mib, |a, &b| a.saturating_add(b));
    let needed = if sum <= boot_mib {
        boot_mib
    } else {
        // Boot RAM plus whole blocks of hotplugged memory.
        let extra = sum - boot_mib;
        boot_mib.saturating_add(
            extra
                .div_ceil(block_size_mib)
                .saturating_mul(block_size_mib),
        )
    };
    if needed > max_mib {
        return Err(SizingError::TooMuchMemory {
            needed_mib: needed,
            max_mib,
        });
    }
    Ok(needed)
}

/// Round `mib` up to a whole number of blocks.
pub fn round_up_to_block(mib: u64, block_size_mib: u64) -> Result<u64, SizingError> {
    if block_size_mib == 0 {
        return Err(SizingError::ZeroBlockSize);
    }
    Ok(mib.div_ceil(block_size_mib).saturating_mul(block_size_mib))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fractional_until_the_end() {
        assert_eq!(vcpus_for(0.5, &[0.25], 1, 8), Ok(1));
        assert_eq!(vcpus_for(0.0, &[0.5, 0.25], 1, 8), Ok(1));
        assert_eq!(vcpus_for(0.5, &[0.25, 0.5], 1, 8), Ok(2));
        assert_eq!(
            vcpus_for(0.1, &[0.2, 0.7], 1, 8),
            Ok(1),
            "0.1+0.2+0.7 float noise"
        );
        assert_eq!(vcpus_for(1.0, &[2.0, 1.5], 1, 8), Ok(5));
        assert_eq!(
            vcpus_for(0.0, &[], 1, 8),
            Ok(1),
            "never below the boot count"
        );
        assert_eq!(vcpus_for(0.0, &[], 2, 8), Ok(2));
    }

    #[test]
    fn vcpu_limits_and_errors() {
        assert_eq!(
            vcpus_for(0.5, &[4.0], 1, 4),
            Err(SizingError::TooManyVcpus { needed: 5, max: 4 })
        );
        assert_eq!(vcpus_for(0.5, &[3.5], 1, 4), Ok(4));
        assert!(matches!(
            vcpus_for(0.0, &[1.0, -1.0], 1, 4),
            Err(SizingError::BadCpuLimit { index: 1, .. })
        ));
        assert!(matches!(
            vcpus_for(f64::NAN, &[], 1, 4),
            Err(SizingError::BadOverhead(_))
        ));
        let msg = vcpus_for(0.0, &[f64::INFINITY], 1, 4)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("containers[0].cpu_limit"), "{msg}");
    }

    #[test]
    fn memory_rounds_to_blocks() {
        // 256 MiB boot, 128 MiB blocks: 64 + 300 = 364 -> 256 + 128 = 384.
        assert_eq!(memory_for(64, &[300], 128, 256, 1024), Ok(384));
        assert_eq!(memory_for(64, &[100], 128, 256, 1024), Ok(256));
        assert_eq!(memory_for(64, &[192, 128], 128, 256, 1024), Ok(384));
        assert_eq!(memory_for(0, &[257], 128, 256, 1024), Ok(384));
        assert_eq!(memory_for(0, &[1000], 128, 256, 1024), Ok(1024));
        assert_eq!(
            memory_for(0, &[1100], 128, 256, 1024),
            Err(SizingError::TooMuchMemory {
                needed_mib: 1152,
                max_mib: 1024
            })
        );
        assert_eq!(
            memory_for(0, &[1], 0, 256, 1024),
            Err(SizingError::ZeroBlockSize)
        );
        assert_eq!(round_up_to_block(129, 128), Ok(256));
        assert_eq!(round_up_to_block(128, 128), Ok(128));
        assert_eq!(round_up_to_block(0, 128), Ok(0));
    }
}
