//! Rate-limiter configuration, in Firecracker's shape (`rx_rate_limiter`, `tx_rate_limiter`,
//! `rate_limiter`): a bandwidth bucket (bytes) and an operations bucket, each with a size, an
//! optional one-time burst and a refill time.
//!
//! As in Firecracker, a bucket whose `size` or `refill_time` is 0 means "no limit": the JSON
//! reader turns it into an absent bucket (Firecracker's own `GET /vm/config` shows it absent
//! too), so a [`TokenBucketConfig`] that is present always limits.

use serde::{Deserialize, Deserializer, Serialize};

use crate::error::ConfigError;

/// Longest `refill_time` accepted, in milliseconds: the limiter works in nanoseconds, and
/// `refill_time * 1_000_000` must fit in a `u64` (about 584 years).
pub const MAX_REFILL_TIME_MS: u64 = u64::MAX / 1_000_000;

/// One token bucket: `size` tokens refill completely every `refill_time` milliseconds;
/// `one_time_burst` extra tokens are available once, at the start. Both `size` and
/// `refill_time` are positive in a bucket that is present: in JSON a 0 in either means "no
/// limit" and is read as no bucket ([`TokenBucketConfig::is_unlimited`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenBucketConfig {
    /// Bucket capacity (bytes for bandwidth, operations for ops).
    pub size: u64,
    /// Extra tokens usable once.
    #[serde(default)]
    pub one_time_burst: Option<u64>,
    /// Milliseconds for a full refill.
    pub refill_time: u64,
}

/// A rate limiter: either bucket may be absent (unlimited).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimiterConfig {
    /// Bytes. A bucket of size 0 or refill time 0 in JSON reads as `None` (no limit).
    #[serde(default, deserialize_with = "limiting_bucket")]
    pub bandwidth: Option<TokenBucketConfig>,
    /// Operations (requests or packets). A bucket of size 0 or refill time 0 in JSON reads as
    /// `None` (no limit).
    #[serde(default, deserialize_with = "limiting_bucket")]
    pub ops: Option<TokenBucketConfig>,
}

/// A bucket from JSON, or `None` when it is absent, `null` or Firecracker's "no limit" (size 0
/// or refill time 0).
fn limiting_bucket<'de, D: Deserializer<'de>>(d: D) -> Result<Option<TokenBucketConfig>, D::Error> {
    Ok(Option::<TokenBucketConfig>::deserialize(d)?.filter(|b| !b.is_unlimited()))
}

impl TokenBucketConfig {
    /// Whether this is Firecracker's "no limit" bucket (size 0 or refill time 0). The JSON
    /// reader never yields one; [`TokenBucketConfig::validate`] refuses one built in code (leave
    /// the bucket out instead).
    pub fn is_unlimited(&self) -> bool {
        self.size == 0 || self.refill_time == 0
    }

    /// Check the bucket; `field` is its JSON path.
    pub fn validate(&self, field: &str) -> Result<(), ConfigError> {
        if self.size == 0 {
            return Err(ConfigError::invalid(
                format!("{field}.size"),
                "must be positive in a bucket that is present (size 0 means no limit: leave \
                 the bucket out)",
            ));
        }
        if self.refill_time == 0 {
            return Err(ConfigError::invalid(
                format!("{field}.refill_time"),
                "must be a positive number of milliseconds in a bucket that is present (0 \
                 means no limit: leave the bucket out)",
            ));
        }
        if self.refill_time > MAX_REFILL_TIME_MS {
            return Err(ConfigError::invalid(
                format!("{field}.refill_time"),
                format!(
                    "{} ms is above the maximum of {MAX_REFILL_TIME_MS} ms (the refill time in \
                     nanoseconds must fit in 64 bits)",
                    self.refill_time
                ),
            ));
        }
        Ok(())
    }
}

impl RateLimiterConfig {
    /// Check both buckets; `field` is the limiter's JSON path (e.g. `drives[0].rate_limiter`).
    pub fn validate(&self, field: &str) -> Result<(), ConfigError> {
        if let Some(b) = &self.bandwidth {
            b.validate(&format!("{field}.bandwidth"))?;
        }
        if let Some(o) = &self.ops {
            o.validate(&format!("{field}.ops"))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn firecracker_shape() {
        let j = r#"{"bandwidth": {"size": 1048576, "one_time_burst": 0, "refill_time": 1000},
                    "ops": {"size": 100, "refill_time": 1000}}"#;
        let r: RateLimiterConfig = serde_json::from_str(j).unwrap();
        assert_eq!(r.bandwidth.unwrap().size, 1 << 20);
        assert_eq!(r.ops.unwrap().one_time_burst, None);
        r.validate("x").unwrap();
        let bad: Result<RateLimiterConfig, _> =
            serde_json::from_str(r#"{"bandwidth": {"size": 1, "refill_time": 1, "rate": 2}}"#);
        assert!(bad
            .unwrap_err()
            .to_string()
            .contains("unknown field `rate`"));
    }

    #[test]
    fn size_or_refill_time_zero_means_no_limit() {
        // Firecracker: TokenBucket::new returns None (no limiting) for either being 0.
        let j = r#"{"bandwidth": {"size": 0, "refill_time": 1000},
                    "ops": {"size": 10, "one_time_burst": 5, "refill_time": 0}}"#;
        let r: RateLimiterConfig = serde_json::from_str(j).unwrap();
        assert_eq!(r, RateLimiterConfig::default());
        r.validate("x").unwrap();
        let j = r#"{"bandwidth": {"size": 0, "one_time_burst": 0, "refill_time": 0},
                    "ops": {"size": 100, "refill_time": 1000}}"#;
        let r: RateLimiterConfig = serde_json::from_str(j).unwrap();
        assert_eq!(r.bandwidth, None);
        assert_eq!(r.ops.unwrap().size, 100);
        let r: RateLimiterConfig =
            serde_json::from_str(r#"{"bandwidth": null, "ops": null}"#).unwrap();
        assert_eq!(r, RateLimiterConfig::default());
        assert!(TokenBucketConfig {
            size: 0,
            one_time_burst: None,
            refill_time: 5
        }
        .is_unlimited());
        // A bucket that limits survives a round trip; a "no limit" one is shown absent.
        let r: RateLimiterConfig = serde_json::from_str(
            r#"{"bandwidth": {"size": 1, "refill_time": 1}, "ops": {"size": 0, "refill_time": 1}}"#,
        )
        .unwrap();
        let back: RateLimiterConfig =
            serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(back, r);
        assert!(!serde_json::to_string(&r).unwrap().contains("\"size\":0"));
    }

    #[test]
    fn errors_name_the_field() {
        let r = RateLimiterConfig {
            bandwidth: Some(TokenBucketConfig {
                size: 0,
                one_time_burst: None,
                refill_time: 100,
            }),
            ops: None,
        };
        let e = r
            .validate("network-interfaces[0].tx_rate_limiter")
            .unwrap_err();
        assert_eq!(
            e.field(),
            Some("network-interfaces[0].tx_rate_limiter.bandwidth.size")
        );
        let r = RateLimiterConfig {
            bandwidth: None,
            ops: Some(TokenBucketConfig {
                size: 10,
                one_time_burst: None,
                refill_time: 0,
            }),
        };
        let e = r.validate("drives[1].rate_limiter").unwrap_err();
        assert_eq!(e.field(), Some("drives[1].rate_limiter.ops.refill_time"));
    }

    #[test]
    fn refill_times_that_overflow_nanoseconds_are_refused() {
        let bucket = |refill_time| RateLimiterConfig {
            bandwidth: Some(TokenBucketConfig {
                size: 1,
                one_time_burst: None,
                refill_time,
            }),
            ops: None,
        };
        // The reported bug: 2^58 ms overflowed `refill_time * 1_000_000`.
        let e = bucket(1 << 58)
            .validate("drives[0].rate_limiter")
            .unwrap_err();
        assert_eq!(
            e.field(),
            Some("drives[0].rate_limiter.bandwidth.refill_time")
        );
        assert!(e.to_string().contains("maximum"), "{e}");
        bucket(u64::MAX).validate("x").unwrap_err();
        bucket(MAX_REFILL_TIME_MS + 1).validate("x").unwrap_err();
        bucket(MAX_REFILL_TIME_MS).validate("x").unwrap();
        assert!(MAX_REFILL_TIME_MS.checked_mul(1_000_000).is_some());
    }
}
