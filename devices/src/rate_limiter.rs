//! Token-bucket rate limiter shared by virtio-blk and virtio-net.
//!
//! Two optional buckets — bandwidth (bytes) and operations — each refilling `size` tokens per
//! `refill_time`, with a one-time burst that is spent first and never refilled. A request that
//! cannot be paid for blocks the limiter and arms a timerfd for the moment enough tokens will
//! have accumulated; the device watches the timerfd on its event loop and resumes the queue when
//! it fires ([`RateLimiter::on_timer`]). Nothing polls.
//!
//! A request larger than a bucket's size can never be paid in full; it is let through when the
//! bucket is full and drives the budget negative, so the limiter waits proportionally longer
//! afterwards (the long-run rate still holds, and a large request cannot deadlock the queue).
//!
//! Save and restore: [`RateLimiter::state`] is what the buckets hold (budget and one-time burst
//! left, refilled up to the moment of the save) as a serde struct, [`RateLimiter::restore`]
//! takes it over on a limiter built from the same bucket sizes and refill times. Time is
//! relative: no instant is saved, so a restored bucket refills from the moment of the restore
//! (time spent in the snapshot file does not refill it).

use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use kestrel_api::{RateLimiterConfig, TokenBucketConfig};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use vmm_sys_util::timerfd::TimerFd;

/// Time source (real or fake in tests).
pub trait Clock: Send {
    /// Monotonic time since an arbitrary origin.
    fn now(&self) -> Duration;
}

/// The monotonic clock.
#[derive(Debug)]
pub struct MonotonicClock(Instant);

impl Default for MonotonicClock {
    fn default() -> Self {
        MonotonicClock(Instant::now())
    }
}

impl Clock for MonotonicClock {
    fn now(&self) -> Duration {
        self.0.elapsed()
    }
}

/// Which bucket a request draws from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenType {
    /// Bytes.
    Bytes,
    /// Operations.
    Ops,
}

/// The saved state of one [`TokenBucket`] ([`TokenBucket::state`]): its shape, to match the
/// bucket it is restored into, and what it held.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenBucketState {
    /// Bucket size in tokens.
    pub size: u64,
    /// Refill time of a full bucket, in nanoseconds.
    pub refill_ns: u64,
    /// Tokens in the bucket at the save (negative: owed after an oversize request).
    pub budget: i128,
    /// One-time burst left.
    pub one_time_burst: u64,
}

/// The saved state of a [`RateLimiter`] ([`RateLimiter::state`]): each configured bucket's.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RateLimiterState {
    /// The bandwidth (bytes) bucket, if configured.
    #[serde(default)]
    pub bandwidth: Option<TokenBucketState>,
    /// The operations bucket, if configured.
    #[serde(default)]
    pub ops: Option<TokenBucketState>,
}

/// Why a saved [`RateLimiterState`] does not fit a limiter.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum RateLimiterStateError {
    /// A bucket is configured on one side only, or with another size or refill time.
    #[error("saved {bucket} bucket ({saved}) does not match the configured one ({configured})")]
    Shape {
        /// `bandwidth` or `ops`.
        bucket: &'static str,
        /// The saved bucket's shape (`size/refill_ns`, or `none`).
        saved: String,
        /// The configured bucket's shape.
        configured: String,
    },
}

/// One token bucket. Budget is in tokens; it may go negative after an oversize request.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    size: u64,
    refill_ns: u64,
    burst: u64,
    budget: i128,
    last: Duration,
}

/// A bucket's refill time in nanoseconds, never 0 and saturating instead of overflowing (the
/// config validation refuses refill times whose nanoseconds overflow; this stays safe for any
/// value that reaches it anyway).
fn refill_ns(cfg: &TokenBucketConfig) -> u64 {
    cfg.refill_time.max(1).saturating_mul(1_000_000)
}

impl TokenBucket {
    /// A full bucket at time `now`.
    pub fn new(cfg: &TokenBucketConfig, now: Duration) -> Self {
        TokenBucket {
            size: cfg.size,
            refill_ns: refill_ns(cfg),
            burst: cfg.one_time_burst.unwrap_or(0),
            budget: i128::from(cfg.size),
            last: now,
        }
    }

    fn refill(&mut self, now: Duration) {
        // Sizes and refill times come from the user: no product below may overflow, and
        // neither divisor may be 0 (`TokenBucket::new` keeps `refill_ns` >= 1).
        let size = u128::from(self.size.max(1));
        let refill_ns = u128::from(self.refill_ns.max(1));
        let elapsed = now.saturating_sub(self.last).as_nanos();
        // tokens = elapsed * size / refill_ns, keeping the remainder time for next time.
        let tokens = elapsed.saturating_mul(size) / refill_ns;
        if tokens > 0 {
            let used_ns = (tokens.saturating_mul(refill_ns) / size).min(elapsed);
            let used = Duration::from_nanos(u64::try_from(used_ns).unwrap_or(u64::MAX));
            self.last = self.last.saturating_add(used);
            let tokens = i128::try_from(tokens).unwrap_or(i128::MAX);
            self.budget = self
                .budget
                .saturating_add(tokens)
                .min(i128::from(self.size));
        }
        if self.budget >= i128::from(self.size) {
            // A full bucket does not bank time.
            self.last = now;
        }
    }

    /// Try to take `tokens` at `now`. Returns true if granted.
    pub fn reduce(&mut self, tokens: u64, now: Duration) -> bool {
        self.refill(now);
        // One-time burst first.
        let from_burst = tokens.min(self.burst);
        let need = i128::from(tokens - from_burst);
        if need == 0 {
            self.burst -= from_burst;
            return true;
        }
        if need <= self.budget {
            self.burst -= from_burst;
            self.budget = self.budget.saturating_sub(need);
            return true;
        }
        if need > i128::from(self.size) && self.budget >= i128::from(self.size) {
            // Oversize request on a full bucket: let it through, pay it back later.
            self.burst -= from_burst;
            self.budget = self.budget.saturating_sub(need);
            return true;
        }
        false
    }

    /// Give back tokens (a request was not carried out after all).
    pub fn replenish(&mut self, tokens: u64) {
        self.budget = self
            .budget
            .saturating_add(i128::from(tokens))
            .min(i128::from(self.size));
    }

    /// How long until `tokens` (capped at the bucket size) can be taken.
    pub fn time_until(&self, tokens: u64, now: Duration) -> Duration {
        let want = i128::from(tokens.min(self.size));
        let mut b = self.clone();
        b.refill(now);
        let missing = want - b.budget;
        if missing <= 0 {
            return Duration::ZERO;
        }
        let ns = (missing
            .unsigned_abs()
            .saturating_mul(u128::from(self.refill_ns)))
        .div_ceil(u128::from(self.size.max(1)));
        Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX))
    }

    /// Current budget (tests, metrics).
    pub fn budget(&self) -> i128 {
        self.budget
    }

    /// Remaining one-time burst.
    pub fn burst(&self) -> u64 {
        self.burst
    }

    /// The state to save: the budget refilled up to `now` and the burst left.
    pub fn state(&self, now: Duration) -> TokenBucketState {
        let mut b = self.clone();
        b.refill(now);
        TokenBucketState {
            size: b.size,
            refill_ns: b.refill_ns,
            budget: b.budget,
            one_time_burst: b.burst,
        }
    }

    /// Whether `state` was saved from a bucket of this size and refill time.
    fn fits(&self, state: &TokenBucketState) -> bool {
        self.size == state.size && self.refill_ns == state.refill_ns
    }

    /// Take over the budget and burst of `state` (which [`TokenBucket::fits`]); the bucket
    /// refills from `now` on. A budget above the size is capped.
    fn restore(&mut self, state: &TokenBucketState, now: Duration) {
        self.budget = state.budget.min(i128::from(self.size));
        self.burst = state.one_time_burst;
        self.last = now;
    }
}

/// A device's limiter takes over `saved` (`None`: the device had no buckets) if it is of the
/// same shape; otherwise the buckets stay full and a warning names the device (`who`) and
/// `what` limiter it is.
pub(crate) fn restore_or_warn(
    limiter: &mut RateLimiter,
    saved: Option<&RateLimiterState>,
    who: impl std::fmt::Display,
    what: &str,
) {
    let saved = saved.copied().unwrap_or_default();
    if let Err(e) = limiter.restore(&saved) {
        tracing::warn!("{who}: {what} not restored ({e}); its buckets start full");
    }
}

/// The saved state of a device's limiter: `None` when it has no bucket.
pub(crate) fn saved_state(limiter: &RateLimiter) -> Option<RateLimiterState> {
    (!limiter.is_unlimited()).then(|| limiter.state())
}

/// How a bucket (or its absence) reads in a [`RateLimiterStateError`].
fn shape(size_refill: Option<(u64, u64)>) -> String {
    size_refill.map_or_else(|| "none".to_string(), |(s, r)| format!("{s}/{r}ns"))
}

/// A rate limiter with its wake-up timer.
pub struct RateLimiter {
    bandwidth: Option<TokenBucket>,
    ops: Option<TokenBucket>,
    clock: Box<dyn Clock>,
    timer: Option<TimerFd>,
    blocked: bool,
    /// Requests that had to wait.
    pub throttled_events: u64,
}

impl std::fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimiter")
            .field("bandwidth", &self.bandwidth)
            .field("ops", &self.ops)
            .field("blocked", &self.blocked)
            .finish()
    }
}

impl RateLimiter {
    /// A limiter on the monotonic clock with a real timerfd. The timerfd is non-blocking, so a
    /// spurious wake-up of the event loop reads nothing instead of blocking it.
    pub fn new(cfg: &RateLimiterConfig) -> std::io::Result<Self> {
        let timer = TimerFd::new().map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
        crate::set_nonblocking(timer.as_raw_fd())?;
        Ok(Self::with_clock(
            cfg,
            Box::new(MonotonicClock::default()),
            Some(timer),
        ))
    }

    /// A limiter on any clock, with an optional timer (tests pass a fake clock and no timer).
    pub fn with_clock(
        cfg: &RateLimiterConfig,
        clock: Box<dyn Clock>,
        timer: Option<TimerFd>,
    ) -> Self {
        let now = clock.now();
        RateLimiter {
            bandwidth: cfg.bandwidth.as_ref().map(|b| TokenBucket::new(b, now)),
            ops: cfg.ops.as_ref().map(|b| TokenBucket::new(b, now)),
            clock,
            timer,
            blocked: false,
            throttled_events: 0,
        }
    }

    /// Whether no bucket is configured.
    pub fn is_unlimited(&self) -> bool {
        self.bandwidth.is_none() && self.ops.is_none()
    }

    /// Whether the limiter is waiting for its timer.
    pub fn is_blocked(&self) -> bool {
        self.blocked
    }

    /// Pay for one operation of `bytes` bytes. On refusal the limiter blocks and arms its timer
    /// for when the request will fit; the caller keeps the request and retries after
    /// [`RateLimiter::on_timer`].
    pub fn consume(&mut self, bytes: u64) -> bool {
        if self.blocked {
            return false;
        }
        let now = self.clock.now();
        let ops_ok = self.ops.as_mut().is_none_or(|b| b.reduce(1, now));
        if !ops_ok {
            let wait = self
                .ops
                .as_ref()
                .map_or(Duration::ZERO, |b| b.time_until(1, now));
            self.block(wait);
            return false;
        }
        let bw_ok = self.bandwidth.as_mut().is_none_or(|b| b.reduce(bytes, now));
        if !bw_ok {
            if let Some(o) = self.ops.as_mut() {
                o.replenish(1);
            }
            let wait = self
                .bandwidth
                .as_ref()
                .map_or(Duration::ZERO, |b| b.time_until(bytes, now));
            self.block(wait);
            return false;
        }
        true
    }

    /// Give back tokens of a request that was paid for but not carried out.
    pub fn manual_replenish(&mut self, tokens: u64, kind: TokenType) {
        let b = match kind {
            TokenType::Bytes => self.bandwidth.as_mut(),
            TokenType::Ops => self.ops.as_mut(),
        };
        if let Some(b) = b {
            b.replenish(tokens);
        }
    }

    fn block(&mut self, wait: Duration) {
        self.throttled_events += 1;
        self.arm(wait);
    }

    /// Block and arm the timer for `wait`.
    fn arm(&mut self, wait: Duration) {
        self.blocked = true;
        // At least 1 ms: a zero timer would disarm the timerfd.
        let wait = wait.max(Duration::from_millis(1));
        if let Some(t) = self.timer.as_mut() {
            if let Err(e) = t.reset(wait, None) {
                tracing::error!("rate limiter timer: {e}; unblocking immediately");
                self.blocked = false;
            }
        }
    }

    /// The timer fired: drain it and unblock. Returns true if the limiter was blocked (the
    /// device should resume its queue).
    pub fn on_timer(&mut self) -> bool {
        if let Some(t) = self.timer.as_mut() {
            let _ = t.wait();
        }
        std::mem::replace(&mut self.blocked, false)
    }

    /// Unblock without a timer (tests with a fake clock).
    pub fn unblock(&mut self) {
        self.blocked = false;
    }

    /// Replace the buckets at runtime (API update). Buckets restart full; an unchanged config
    /// keeps its state.
    pub fn update(&mut self, cfg: &RateLimiterConfig) {
        let now = self.clock.now();
        let same = |old: &Option<TokenBucket>, new: &Option<TokenBucketConfig>| match (old, new) {
            (Some(o), Some(n)) => o.size == n.size && o.refill_ns == refill_ns(n),
            (None, None) => true,
            _ => false,
        };
        if !same(&self.bandwidth, &cfg.bandwidth) {
            self.bandwidth = cfg.bandwidth.as_ref().map(|b| TokenBucket::new(b, now));
        }
        if !same(&self.ops, &cfg.ops) {
            self.ops = cfg.ops.as_ref().map(|b| TokenBucket::new(b, now));
        }
        // A new config may allow what was refused: let the device retry now.
        if self.blocked {
            self.arm(Duration::from_millis(1));
        }
    }

    /// The bandwidth bucket, for metrics and tests.
    pub fn bandwidth(&self) -> Option<&TokenBucket> {
        self.bandwidth.as_ref()
    }

    /// The operations bucket, for metrics and tests.
    pub fn ops(&self) -> Option<&TokenBucket> {
        self.ops.as_ref()
    }

    /// The buckets' state to save, as of now.
    pub fn state(&self) -> RateLimiterState {
        let now = self.clock.now();
        RateLimiterState {
            bandwidth: self.bandwidth.as_ref().map(|b| b.state(now)),
            ops: self.ops.as_ref().map(|b| b.state(now)),
        }
    }

    /// Take over saved bucket state on a limiter of the same shape (the same buckets, each
    /// with the same size and refill time), e.g. one just built from a restored config:
    /// budgets and bursts come back and refill from now on.
    ///
    /// # Errors
    /// [`RateLimiterStateError::Shape`] naming the first bucket that differs; nothing
    /// changed (the buckets stay full).
    pub fn restore(&mut self, state: &RateLimiterState) -> Result<(), RateLimiterStateError> {
        let pairs = [
            ("bandwidth", &self.bandwidth, &state.bandwidth),
            ("ops", &self.ops, &state.ops),
        ];
        for (bucket, mine, saved) in pairs {
            let fits = match (mine, saved) {
                (Some(m), Some(s)) => m.fits(s),
                (None, None) => true,
                _ => false,
            };
            if !fits {
                return Err(RateLimiterStateError::Shape {
                    bucket,
                    saved: shape(saved.map(|s| (s.size, s.refill_ns))),
                    configured: shape(mine.as_ref().map(|m| (m.size, m.refill_ns))),
                });
            }
        }
        let now = self.clock.now();
        for (mine, saved) in [
            (&mut self.bandwidth, &state.bandwidth),
            (&mut self.ops, &state.ops),
        ] {
            if let (Some(m), Some(s)) = (mine.as_mut(), saved) {
                m.restore(s, now);
            }
        }
        Ok(())
    }
}

impl AsRawFd for RateLimiter {
    /// The timerfd to watch (-1 when the limiter has no timer).
    fn as_raw_fd(&self) -> RawFd {
        self.timer.as_ref().map_or(-1, |t| t.as_raw_fd())
    }
}

/// A hand-moved clock and a bucket builder for the limiter's and the devices' tests.
#[cfg(test)]
pub(crate) mod test_util {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    use kestrel_api::TokenBucketConfig;

    use super::Clock;

    /// A clock the test moves by hand.
    #[derive(Clone, Default)]
    pub(crate) struct FakeClock(Arc<AtomicU64>);

    impl FakeClock {
        pub(crate) fn advance_ms(&self, ms: u64) {
            self.0.fetch_add(ms * 1_000_000, Ordering::SeqCst);
        }
    }

    impl Clock for FakeClock {
        fn now(&self) -> Duration {
            Duration::from_nanos(self.0.load(Ordering::SeqCst))
        }
    }

    /// `size` tokens per `refill_ms`, with an optional one-time burst.
    pub(crate) fn bucket(size: u64, burst: Option<u64>, refill_ms: u64) -> TokenBucketConfig {
        TokenBucketConfig {
            size,
            one_time_burst: burst,
            refill_time: refill_ms,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_util::{bucket, FakeClock};
    use super::*;

    fn limiter(
        bw: Option<TokenBucketConfig>,
        ops: Option<TokenBucketConfig>,
    ) -> (RateLimiter, FakeClock) {
        let c = FakeClock::default();
        let cfg = RateLimiterConfig { bandwidth: bw, ops };
        (RateLimiter::with_clock(&cfg, Box::new(c.clone()), None), c)
    }

    #[test]
    fn bucket_refills_linearly_and_caps_at_size() {
        let mut b = TokenBucket::new(&bucket(1000, None, 1000), Duration::ZERO);
        assert!(b.reduce(1000, Duration::ZERO));
        assert!(!b.reduce(1, Duration::ZERO));
        assert!(!b.reduce(300, Duration::from_millis(299)));
        assert!(b.reduce(300, Duration::from_millis(300)));
        assert_eq!(b.budget(), 0);
        // Long idle time refills only up to the size.
        assert!(!b.reduce(1001, Duration::from_secs(100)) || b.budget() < 0);
        let mut b = TokenBucket::new(&bucket(1000, None, 1000), Duration::ZERO);
        b.reduce(1000, Duration::ZERO);
        b.refill(Duration::from_secs(100));
        assert_eq!(b.budget(), 1000);
    }

    #[test]
    fn one_time_burst_is_spent_first_and_never_refilled() {
        let mut b = TokenBucket::new(&bucket(100, Some(500), 1000), Duration::ZERO);
        assert!(b.reduce(550, Duration::ZERO));
        assert_eq!(b.burst(), 0);
        assert_eq!(b.budget(), 50);
        b.refill(Duration::from_secs(10));
        assert_eq!(b.burst(), 0);
        assert_eq!(b.budget(), 100);
    }

    #[test]
    fn time_until_is_exact() {
        let mut b = TokenBucket::new(&bucket(1000, None, 1000), Duration::ZERO);
        b.reduce(1000, Duration::ZERO);
        assert_eq!(
            b.time_until(250, Duration::ZERO),
            Duration::from_millis(250)
        );
        assert_eq!(b.time_until(5000, Duration::ZERO), Duration::from_secs(1));
        assert_eq!(
            b.time_until(100, Duration::from_millis(100)),
            Duration::ZERO
        );
    }

    #[test]
    fn oversize_request_passes_on_full_bucket_then_waits() {
        let mut b = TokenBucket::new(&bucket(1000, None, 1000), Duration::ZERO);
        assert!(b.reduce(3000, Duration::ZERO));
        assert_eq!(b.budget(), -2000);
        assert!(!b.reduce(1, Duration::from_millis(2000)));
        assert!(b.reduce(1, Duration::from_millis(2001)));
    }

    #[test]
    fn limiter_blocks_and_unblocks() {
        let (mut rl, clock) = limiter(
            Some(bucket(1 << 20, None, 1000)),
            Some(bucket(10, None, 1000)),
        );
        for _ in 0..10 {
            assert!(rl.consume(1000));
        }
        assert!(!rl.consume(1000), "ops bucket empty");
        assert!(rl.is_blocked());
        assert!(!rl.consume(1), "blocked until the timer fires");
        clock.advance_ms(100);
        rl.unblock();
        assert!(rl.consume(1000));
        // Bandwidth: drain it, then a refused request gives its op token back.
        let (mut rl, clock) = limiter(Some(bucket(4096, None, 1000)), Some(bucket(10, None, 1000)));
        assert!(rl.consume(4096));
        assert!(!rl.consume(4096));
        assert_eq!(rl.throttled_events, 1);
        rl.unblock();
        clock.advance_ms(1000);
        assert!(rl.consume(4096));
    }

    #[test]
    fn rate_holds_over_time() {
        // 1 MiB/s with 64 KiB requests over 5 simulated seconds.
        let (mut rl, clock) = limiter(Some(bucket(1 << 20, None, 1000)), None);
        let mut sent = 0u64;
        for _ in 0..5000 {
            if rl.consume(64 << 10) {
                sent += 64 << 10;
            } else {
                rl.unblock();
            }
            clock.advance_ms(1);
        }
        // 1 MiB initial bucket + 5 MiB of refill.
        assert!(((6 << 20) - (64 << 10)..=6 << 20).contains(&sent), "{sent}");
    }

    #[test]
    fn real_timer_fires() {
        let cfg = RateLimiterConfig {
            bandwidth: Some(bucket(1000, None, 100)),
            ops: None,
        };
        let mut rl = RateLimiter::new(&cfg).unwrap();
        assert!(rl.as_raw_fd() >= 0);
        assert!(rl.consume(1000));
        assert!(!rl.consume(500));
        let t0 = Instant::now();
        // Wait for the (non-blocking) timerfd like the event loop would.
        let mut pfd = libc::pollfd {
            fd: rl.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd on the stack for the duration of the call.
        let n = unsafe { libc::poll(&mut pfd, 1, 5000) };
        assert_eq!(n, 1, "the timer fired");
        assert!(rl.on_timer());
        let waited = t0.elapsed();
        assert!(waited >= Duration::from_millis(40), "{waited:?}");
        assert!(rl.consume(500));
    }

    #[test]
    fn update_at_runtime() {
        let (mut rl, _clock) = limiter(Some(bucket(100, None, 1000)), None);
        assert!(rl.consume(100));
        assert!(!rl.consume(100));
        rl.update(&RateLimiterConfig {
            bandwidth: Some(bucket(10_000, None, 1000)),
            ops: None,
        });
        rl.unblock();
        assert!(rl.consume(5000));
        rl.update(&RateLimiterConfig::default());
        assert!(rl.is_unlimited());
        assert!(rl.consume(u64::MAX));
    }
}

#[cfg(test)]
mod overflow_tests {
    use super::test_util::{bucket, FakeClock};
    use super::*;

    /// Values validation refuses must still not overflow or divide by zero if they reach the
    /// limiter (e.g. the reported `refill_time` of 2^58 ms, whose nanoseconds wrapped).
    #[test]
    fn extreme_bucket_values_neither_overflow_nor_divide_by_zero() {
        let extremes = [0, 1, 1 << 58, u64::MAX / 1_000_000, u64::MAX];
        for &size in &extremes {
            for &refill in &extremes {
                let c = FakeClock::default();
                let cfg = RateLimiterConfig {
                    bandwidth: Some(bucket(size, Some(u64::MAX), refill)),
                    ops: Some(bucket(size, None, refill)),
                };
                let mut l = RateLimiter::with_clock(&cfg, Box::new(c.clone()), None);
                for step in [0, 1, 1_000, u64::MAX / 4_000_000] {
                    c.advance_ms(step);
                    let _ = l.consume(u64::MAX);
                    let _ = l.consume(1);
                    l.unblock();
                    l.manual_replenish(u64::MAX, TokenType::Bytes);
                    l.manual_replenish(u64::MAX, TokenType::Ops);
                    if let Some(b) = l.bandwidth() {
                        let _ = b.time_until(u64::MAX, c.now());
                    }
                }
                let saved = l.state();
                let back: RateLimiterState =
                    serde_json::from_str(&serde_json::to_string(&saved).unwrap()).unwrap();
                assert_eq!(back, saved);
                let mut fresh = RateLimiter::with_clock(&cfg, Box::new(c.clone()), None);
                fresh.restore(&back).unwrap();
                let _ = fresh.consume(u64::MAX);
                l.update(&RateLimiterConfig::default());
            }
        }
    }
}

#[cfg(test)]
mod state_tests {
    use super::test_util::{bucket, FakeClock};
    use super::*;

    fn limiter(cfg: &RateLimiterConfig) -> (RateLimiter, FakeClock) {
        let c = FakeClock::default();
        (RateLimiter::with_clock(cfg, Box::new(c.clone()), None), c)
    }

    fn both(bw: u64, ops: u64) -> RateLimiterConfig {
        RateLimiterConfig {
            bandwidth: Some(bucket(bw, Some(5000), 1000)),
            ops: Some(bucket(ops, None, 1000)),
        }
    }

    /// A drained bucket restored into a fresh limiter (full buckets) stays drained: it refills
    /// from the restore on, at the configured rate, and the burst left comes back.
    #[test]
    fn drained_bucket_restored_stays_drained() {
        let cfg = both(1000, 10);
        let (mut rl, clock) = limiter(&cfg);
        assert!(
            rl.consume(5000 + 1000),
            "burst, then the whole bandwidth budget"
        );
        for _ in 1..10 {
            assert!(rl.consume(0));
        }
        clock.advance_ms(100);
        let saved = rl.state();
        let bw = saved.bandwidth.unwrap();
        assert_eq!(
            (bw.budget, bw.one_time_burst),
            (100, 0),
            "refilled to the save"
        );
        assert_eq!(saved.ops.unwrap().budget, 1);

        // Much later, elsewhere: time in the snapshot does not refill it.
        let (mut back, clock) = limiter(&cfg);
        clock.advance_ms(1_000_000);
        back.restore(&saved).unwrap();
        assert_eq!(back.bandwidth().unwrap().budget(), 100);
        assert_eq!(back.bandwidth().unwrap().burst(), 0);
        assert_eq!(back.ops().unwrap().budget(), 1);
        assert!(!back.consume(500), "still drained");
        assert!(back.is_blocked());
        back.unblock();
        clock.advance_ms(400);
        assert!(back.consume(500), "refilled from the restore on");
        // An unused burst survives too.
        let (fresh, _) = limiter(&cfg);
        let s = fresh.state();
        assert_eq!(s.bandwidth.unwrap().one_time_burst, 5000);
        assert_eq!(s.bandwidth.unwrap().budget, 1000);
    }

    /// The state survives serde_json, negative budgets (an oversize request owed) included.
    #[test]
    fn state_round_trips_through_serde_json() {
        let (mut rl, _clock) = limiter(&both(1000, 10));
        assert!(rl.consume(5000 + 3000), "oversize on a full bucket");
        let saved = rl.state();
        assert_eq!(saved.bandwidth.unwrap().budget, -2000);
        let json = serde_json::to_string(&saved).unwrap();
        let back: RateLimiterState = serde_json::from_str(&json).unwrap();
        assert_eq!(back, saved);
        let (mut restored, _) = limiter(&both(1000, 10));
        restored.restore(&back).unwrap();
        assert_eq!(restored.state(), saved);
        // Missing buckets read as none.
        let empty: RateLimiterState = serde_json::from_str("{}").unwrap();
        assert_eq!(empty, RateLimiterState::default());
        let extreme = TokenBucketState {
            size: u64::MAX,
            refill_ns: 1,
            budget: -i128::from(u64::MAX),
            one_time_burst: u64::MAX,
        };
        let json = serde_json::to_string(&extreme).unwrap();
        assert_eq!(
            serde_json::from_str::<TokenBucketState>(&json).unwrap(),
            extreme
        );
    }

    /// A state of another shape is refused and changes nothing.
    #[test]
    fn state_of_another_shape_is_refused() {
        let (mut rl, _clock) = limiter(&both(1000, 10));
        assert!(rl.consume(1000));
        let saved = rl.state();
        let shapes = [
            both(2000, 10),
            both(1000, 20),
            RateLimiterConfig {
                bandwidth: Some(bucket(1000, Some(5000), 500)),
                ops: Some(bucket(10, None, 1000)),
            },
            RateLimiterConfig {
                bandwidth: Some(bucket(1000, Some(5000), 1000)),
                ops: None,
            },
            RateLimiterConfig::default(),
        ];
        for cfg in &shapes {
            let (mut other, _) = limiter(cfg);
            let before = other.state();
            let e = other.restore(&saved).unwrap_err();
            assert!(matches!(e, RateLimiterStateError::Shape { .. }), "{e}");
            assert_eq!(other.state(), before, "nothing changed");
        }
        let e = limiter(&RateLimiterConfig::default())
            .0
            .restore(&saved)
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "saved bandwidth bucket (1000/1000000000ns) does not match the configured one (none)"
        );
        // An unlimited limiter takes an unlimited state.
        let (mut none, _) = limiter(&RateLimiterConfig::default());
        none.restore(&RateLimiterState::default()).unwrap();
        assert!(none.is_unlimited());
    }
}
