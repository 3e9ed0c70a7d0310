//! Per-source limits: `max_connections_per_source`, `max_connection_rate` and
//! `max_connection_rate_per_source`, in memory fixed at service start whatever the number of
//! sources, shared by every worker with no lock: atomics only.
//!
//! # Why it exists
//!
//! `max_connections` bounds a service, not a client: one client (or one host rotating IPv6
//! addresses) could take every slot. xinetd (`per_source`, `cps`) and systemd
//! (`MaxConnectionsPerSource=`) bound each source; this is wharf's equivalent, applied at
//! admission by [`crate::gate`].
//!
//! # Sources
//!
//! A source is what [`Source::with_prefix_v6`] makes of the client's address: an IPv4 address
//! (IPv4-mapped IPv6 too), or the first `source_prefix_v6` bits (default 64) of an IPv6 one.
//!
//! # The table: a count-min sketch of sources
//!
//! A map from source to state would grow with every distinct source an attacker invents.
//! Instead each service has one [`SourceTable`] of [`ROWS`] rows of `width` slots, allocated
//! once, when the first generation with a per-source limit starts, and never resized:
//! `width` is `max_connections` rounded up to a power of two, clamped to
//! [`MIN_SLOTS_PER_ROW`]`..=`[`MAX_SLOTS_PER_ROW`]. A slot is 16 bytes (an open-connection
//! count and a rate cell), so a service's table takes `2 × width × 16` bytes: 512 KiB for the
//! default `max_connections = 10000`, 32 KiB at least, 2 MiB at most
//! ([`SourceLimits::table_bytes`]).
//!
//! A source maps to one slot per row, by a keyed hash (std's `RandomState`: SipHash-1-3 with
//! a key drawn from the OS for each table), so nobody outside the process can choose sources
//! that land on a victim's slots. Every row counts every source that maps to it, so a slot
//! counts its own source *and* whatever shares it: the smaller of a source's two slots is an
//! estimate that is never below the truth (the count-min sketch). A limit is therefore never
//! looser than configured; sharing can only make it stricter, and only when *both* of a
//! source's slots are shared with busy sources.
//!
//! **Collision bound.** With `open` connections open in total and a per-source limit `L`, at
//! most `open / L` slots of a row can hold `L` or more, so a fresh source (whose slots are
//! uniformly random to anyone without the key) is refused by `max_connections_per_source` with
//! probability at most `(open / (L × width))²`. Example: the default `max_connections = 10000`
//! (width 16384) all open, `L = 16`: at most 0.15 %, whatever the attacker does. A flood of
//! distinct sources never grows the table and never refuses everyone: it fills slots at most
//! as fast as it opens connections, which `max_connections` already bounds.
//!
//! # Rates: GCRA, a token bucket in one atomic
//!
//! Rates use the generic cell rate algorithm, which is a token bucket kept as one number: the
//! "theoretical arrival time" (TAT) at which the bucket would be full again. A rate of `r` per
//! second has an emission interval `T = 1 s / r` and a burst of one second's worth (`r`
//! connections at once, from a full bucket); a connection at `now` conforms when
//! `TAT − now ≤ (r − 1) × T`, and taking it moves the TAT to `max(TAT, now) + T`. So a quiet
//! source may open `r` connections at once, then `r` per second; refused attempts take
//! nothing. The whole-service rate is one such cell, updated by compare-and-swap, and exact.
//! Per source, each slot also holds a cell: a source conforms when *either* of its cells does
//! (the count-min rule again), and every admission charges both, so a cell is never behind
//! any of the sources that share it: never looser, at worst stricter when both are shared with
//! sources that are busy at the same moment. Time is the monotonic clock, in nanoseconds since
//! the table was made; tests pass their own `now`.
//!
//! # Concurrency and reloads
//!
//! Admission reads and updates the slots with relaxed atomics (no lock, no allocation): a
//! connection counts in both of its slots before it is judged, and is taken back out if
//! refused, so counts never underflow and a [`SourceHold`] releases exactly what it added,
//! once, on drop. Two admissions of one source racing on different workers can each see room
//! for one: a source can then briefly hold up to `workers − 1` more than its limit (its next
//! connections are refused until it is back under). The whole-service rate has no such race.
//!
//! A reload makes a new [`SourceLimits`] with the new limits, sharing the previous
//! generation's table and whole-service cell: connections of the old generation stay counted
//! against their sources, their holds release into the same table, and new connections are
//! judged by the new limits. Once a generation has a per-source limit, connections are counted
//! in the table even by later generations without one, so turning a limit back on sees them.
//! A table is sized once; a reload that changes `max_connections` keeps the old width.
//!
//! # Why not a crate
//!
//! `governor`'s keyed limiter keeps a map of every key seen (a `DashMap`, sharded locks) that
//! grows until pruned, so neither the bounded memory nor the lock-free accept path hold; its
//! direct limiter is the same GCRA cell as here, for the whole-service rate only. The few
//! lines of GCRA are shared by both kinds of limit here, with explicit time for tests.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use crate::config::ServiceConfig;
use crate::gate::Rejection;
use crate::net::Source;

/// Rows of the per-source table: each source has one slot in each, by independent hashes.
pub const ROWS: usize = 2;

/// Fewest slots per row of the per-source table.
pub const MIN_SLOTS_PER_ROW: usize = 1 << 10;

/// Most slots per row of the per-source table (2 MiB per service in all).
pub const MAX_SLOTS_PER_ROW: usize = 1 << 16;

/// One service's per-source and rate limits, shared by its workers. A reload makes a new one
/// from the previous generation's, sharing its counts.
pub struct SourceLimits {
    shared: Arc<Shared>,
    /// The table, when this generation or an earlier one has a per-source limit.
    table: Option<Arc<SourceTable>>,
    service_rate: Option<Rate>,
    per_source: Option<u32>,
    rate_per_source: Option<Rate>,
    prefix_v6: u8,
}

/// What every generation of a service shares.
struct Shared {
    /// Time zero of every rate cell.
    epoch: Instant,
    /// The whole-service rate cell (`max_connection_rate`).
    service_tat: AtomicU64,
    /// Made by the first generation with a per-source limit.
    table: OnceLock<Arc<SourceTable>>,
}

impl SourceLimits {
    /// The limits of `config`; `previous` is the generation this one replaces, whose counts
    /// carry over.
    pub fn new(config: &ServiceConfig, previous: Option<&Arc<SourceLimits>>) -> Arc<Self> {
        let shared = previous.map_or_else(
            || {
                Arc::new(Shared {
                    epoch: Instant::now(),
                    service_tat: AtomicU64::new(0),
                    table: OnceLock::new(),
                })
            },
            |p| Arc::clone(&p.shared),
        );
        let per_source = config
            .max_connections_per_source
            .map(|n| u32::try_from(n).unwrap_or(u32::MAX));
        let rate_per_source = config.max_connection_rate_per_source.map(Rate::per_second);
        let table = if per_source.is_some() || rate_per_source.is_some() {
            let width = SourceTable::width_for(config.max_connections);
            let table = shared
                .table
                .get_or_init(|| Arc::new(SourceTable::new(width)));
            if table.width < width {
                // Sources share slots more often than the collision bound assumes: limits
                // grow stricter for unlucky sources, never looser. A restart resizes.
                tracing::warn!(
                    slots_per_row = table.width,
                    wanted = width,
                    "max_connections grew past the per-source table made at start; restart \
                     to resize it"
                );
            }
            Some(Arc::clone(table))
        } else {
            shared.table.get().cloned()
        };
        Arc::new(SourceLimits {
            shared,
            table,
            service_rate: config.max_connection_rate.map(Rate::per_second),
            per_source,
            rate_per_source,
            prefix_v6: config.source_prefix_v6,
        })
    }

    /// At accept: whether the service is under `max_connection_rate` (taking a token).
    pub fn admit_service(&self) -> Result<(), Rejection> {
        match self.service_rate {
            None => Ok(()),
            Some(_) => self.admit_service_at(self.now()),
        }
    }

    /// [`SourceLimits::admit_service`] at `now` (time since the limits were first made).
    pub fn admit_service_at(&self, now: Duration) -> Result<(), Rejection> {
        match &self.service_rate {
            Some(rate) if !rate.take(&self.shared.service_tat, nanos(now)) => Err(Rejection::Rate),
            _ => Ok(()),
        }
    }

    /// Gives back the token [`SourceLimits::admit_service`] took, for a connection refused
    /// afterwards (by a per-source limit, `allow_from` behind a proxy): a client over its own
    /// limits must not spend the whole service's rate.
    pub fn refund_service(&self) {
        if let Some(rate) = &self.service_rate {
            rate.refund(&self.shared.service_tat, nanos(self.now()));
        }
    }

    /// Once the client is known: whether its source is under its rate and open-connection
    /// limits. `Some(hold)` keeps one connection counted against the source until dropped.
    pub fn admit_source(&self, client: IpAddr) -> Result<Option<SourceHold>, Rejection> {
        let now = match self.rate_per_source {
            Some(_) => self.now(),
            None => Duration::ZERO,
        };
        self.admit_source_at(client, now)
    }

    /// [`SourceLimits::admit_source`] at `now` (time since the limits were first made).
    pub fn admit_source_at(
        &self,
        client: IpAddr,
        now: Duration,
    ) -> Result<Option<SourceHold>, Rejection> {
        let Some(table) = &self.table else {
            return Ok(None);
        };
        let slots = table.slots_of(Source::with_prefix_v6(client, self.prefix_v6));
        if let Some(rate) = &self.rate_per_source {
            table.take_rate(slots, rate, nanos(now))?;
        }
        table.open(slots, self.per_source)?;
        Ok(Some(SourceHold {
            table: Arc::clone(table),
            slots,
        }))
    }

    /// The estimate of `client`'s open connections: the smaller of its slots' counts, never
    /// below the truth (0 without a table).
    pub fn open_estimate(&self, client: IpAddr) -> u32 {
        self.table.as_ref().map_or(0, |table| {
            let slots = table.slots_of(Source::with_prefix_v6(client, self.prefix_v6));
            table.estimate(slots)
        })
    }

    /// The per-source table's memory, fixed when it was made (0 without one).
    pub fn table_bytes(&self) -> usize {
        self.table.as_ref().map_or(0, |t| t.bytes())
    }

    fn now(&self) -> Duration {
        self.shared.epoch.elapsed()
    }
}

/// Slots per row of a UDP service's per-source rate table (128 KiB in all).
pub const DATAGRAM_SLOTS_PER_ROW: usize = 1 << 12;

/// A UDP service's datagram rates, `max_datagram_rate_per_source` and `max_datagram_rate`:
/// the same GCRA cells and count-min table as connections' (see the module doc), charged per
/// datagram. The table is fixed at [`DATAGRAM_SLOTS_PER_ROW`] slots per row (a datagram holds
/// nothing open, so only the rate cells are used), made once per service and shared by its
/// generations across reloads, like the whole-service cell.
pub struct DatagramRates {
    shared: Arc<DatagramShared>,
    service_rate: Option<Rate>,
    per_source: Option<Rate>,
    prefix_v6: u8,
}

struct DatagramShared {
    epoch: Instant,
    service_tat: AtomicU64,
    table: SourceTable,
}

/// Why [`DatagramRates::admit_at`] refused a datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateExceeded {
    /// Its source is over `max_datagram_rate_per_source`.
    PerSource,
    /// The service is over `max_datagram_rate`.
    Service,
}

impl DatagramRates {
    /// Rates per second (`None`: no bound); `previous` is the generation this one replaces,
    /// whose cells carry over.
    pub fn new(
        service: Option<u32>,
        per_source: Option<u32>,
        prefix_v6: u8,
        previous: Option<&DatagramRates>,
    ) -> Self {
        let shared = previous.map_or_else(
            || {
                Arc::new(DatagramShared {
                    epoch: Instant::now(),
                    service_tat: AtomicU64::new(0),
                    table: SourceTable::new(DATAGRAM_SLOTS_PER_ROW),
                })
            },
            |p| Arc::clone(&p.shared),
        );
        DatagramRates {
            shared,
            service_rate: service.map(Rate::per_second),
            per_source: per_source.map(Rate::per_second),
            prefix_v6,
        }
    }

    /// Time since the rates were first made: read once per batch of datagrams.
    pub fn now(&self) -> Duration {
        self.shared.epoch.elapsed()
    }

    /// Whether a datagram from `client` at `now` is within its source's rate, then the
    /// service's (taking a token from each). The source is judged first, so that a flood from
    /// one source does not spend the whole service's rate.
    pub fn admit_at(&self, client: IpAddr, now: Duration) -> Result<(), RateExceeded> {
        let now = nanos(now);
        if let Some(rate) = &self.per_source {
            let table = &self.shared.table;
            let slots = table.slots_of(Source::with_prefix_v6(client, self.prefix_v6));
            table
                .take_rate(slots, rate, now)
                .map_err(|_| RateExceeded::PerSource)?;
        }
        match &self.service_rate {
            Some(rate) if !rate.take(&self.shared.service_tat, now) => Err(RateExceeded::Service),
            _ => Ok(()),
        }
    }

    /// The per-source table's memory.
    pub fn table_bytes(&self) -> usize {
        self.shared.table.bytes()
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// A rate as a GCRA: the emission interval and the burst's tolerance, in nanoseconds.
#[derive(Debug, Clone, Copy)]
struct Rate {
    /// `1 s / rate`: how far one connection moves the theoretical arrival time.
    interval: u64,
    /// `(rate − 1) × interval`: how far ahead of now the TAT may be, for a burst of `rate`.
    tolerance: u64,
}

impl Rate {
    fn per_second(rate: u32) -> Rate {
        let rate = u64::from(rate.max(1));
        let interval = (1_000_000_000 / rate).max(1);
        Rate {
            interval,
            tolerance: interval * (rate - 1),
        }
    }

    fn conforms(&self, tat: u64, now: u64) -> bool {
        tat <= now.saturating_add(self.tolerance)
    }

    fn charged(&self, tat: u64, now: u64) -> u64 {
        tat.max(now).saturating_add(self.interval)
    }

    /// Gives one token back to `cell` (never more than a full burst).
    fn refund(&self, cell: &AtomicU64, now: u64) {
        let _ = cell.fetch_update(Relaxed, Relaxed, |tat| {
            Some(tat.saturating_sub(self.interval).max(now))
        });
    }

    /// Takes one token from `cell` if it has one.
    fn take(&self, cell: &AtomicU64, now: u64) -> bool {
        cell.fetch_update(Relaxed, Relaxed, |tat| {
            self.conforms(tat, now).then(|| self.charged(tat, now))
        })
        .is_ok()
    }
}

/// Slot indices (into [`SourceTable::slots`]) of one source, one per row.
type Slots = [u32; ROWS];

/// The per-source count-min table of one service; see the module doc.
pub struct SourceTable {
    /// Per process and table: the hash key sources are mapped with.
    key: RandomState,
    /// Slots per row, a power of two.
    width: usize,
    /// Row after row.
    slots: Box<[Slot]>,
}

/// One cell of the table: what the sources that map to it share.
#[derive(Default)]
struct Slot {
    /// Open connections counted here.
    open: AtomicU32,
    /// The GCRA theoretical arrival time of `max_connection_rate_per_source`, in nanoseconds.
    tat: AtomicU64,
}

impl SourceTable {
    fn width_for(max_connections: usize) -> usize {
        max_connections
            .checked_next_power_of_two()
            .unwrap_or(MAX_SLOTS_PER_ROW)
            .clamp(MIN_SLOTS_PER_ROW, MAX_SLOTS_PER_ROW)
    }

    fn new(width: usize) -> SourceTable {
        debug_assert!(width.is_power_of_two() && width <= MAX_SLOTS_PER_ROW);
        SourceTable {
            key: RandomState::new(),
            width,
            slots: (0..ROWS * width).map(|_| Slot::default()).collect(),
        }
    }

    fn bytes(&self) -> usize {
        std::mem::size_of_val(&*self.slots)
    }

    /// One slot per row for `source`, from independent bits of one keyed 64-bit hash.
    fn slots_of(&self, source: Source) -> Slots {
        let hash = self.key.hash_one(source);
        let mask = self.width as u64 - 1;
        std::array::from_fn(|row| {
            let column = (hash >> (32 * row)) & mask;
            (row * self.width) as u32 + column as u32
        })
    }

    fn slot(&self, index: u32) -> &Slot {
        &self.slots[index as usize]
    }

    fn estimate(&self, slots: Slots) -> u32 {
        slots
            .iter()
            .map(|&i| self.slot(i).open.load(Relaxed))
            .min()
            .unwrap_or(0)
    }

    /// Counts one connection in each of `slots`; refused (and taken back out) when every slot
    /// already held `limit`.
    fn open(&self, slots: Slots, limit: Option<u32>) -> Result<(), Rejection> {
        let before = slots.map(|i| self.slot(i).open.fetch_add(1, Relaxed));
        match limit {
            Some(limit) if before.iter().all(|&n| n >= limit) => {
                self.close(slots);
                Err(Rejection::PerSource)
            }
            _ => Ok(()),
        }
    }

    fn close(&self, slots: Slots) {
        for i in slots {
            self.slot(i).open.fetch_sub(1, Relaxed);
        }
    }

    /// Takes a token for a source: refused when none of its cells conforms; otherwise every
    /// cell is charged, so none falls behind any source that maps to it.
    fn take_rate(&self, slots: Slots, rate: &Rate, now: u64) -> Result<(), Rejection> {
        let conforms = slots
            .iter()
            .any(|&i| rate.conforms(self.slot(i).tat.load(Relaxed), now));
        if !conforms {
            return Err(Rejection::RatePerSource);
        }
        for i in slots {
            let _ = self
                .slot(i)
                .tat
                .fetch_update(Relaxed, Relaxed, |tat| Some(rate.charged(tat, now)));
        }
        Ok(())
    }
}

/// One open connection counted against its source; released, once, when dropped.
pub struct SourceHold {
    table: Arc<SourceTable>,
    slots: Slots,
}

impl Drop for SourceHold {
    fn drop(&mut self) {
        self.table.close(self.slots);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::config::ConfigSource;
    use figment::value::Dict;

    const SEC: Duration = Duration::from_secs(1);

    fn config(toml: &str) -> ServiceConfig {
        let text = format!("[services.s]\nplugin = 'echo'\nlisten = '127.0.0.1:0'\n{toml}\n");
        let source = ConfigSource::from_parts(&text, "test.toml", [], Dict::new()).unwrap();
        let (mut config, errors) = source.resolve();
        assert!(errors.is_empty(), "{errors:?}");
        config.services.remove("s").unwrap()
    }

    fn limits(toml: &str) -> Arc<SourceLimits> {
        SourceLimits::new(&config(toml), None)
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn without_limits_nothing_is_counted_or_allocated() {
        let l = limits("");
        assert!(l.admit_service().is_ok());
        assert!(l.admit_source(ip("10.0.0.1")).unwrap().is_none());
        assert_eq!(l.table_bytes(), 0);
    }

    #[test]
    fn per_source_counts_and_releases() {
        let l = limits("max_connections_per_source = 3");
        let a = ip("10.0.0.1");
        let mut held: Vec<_> = (0..3)
            .map(|_| l.admit_source(a).unwrap().unwrap())
            .collect();
        assert_eq!(l.open_estimate(a), 3);
        assert_eq!(l.admit_source(a).err(), Some(Rejection::PerSource));
        // The refusal took nothing.
        assert_eq!(l.open_estimate(a), 3);
        // Another source is not affected.
        let b = l.admit_source(ip("10.0.0.2")).unwrap();
        drop(b);
        held.pop();
        assert_eq!(l.open_estimate(a), 2);
        let again = l.admit_source(a).unwrap();
        assert!(l.admit_source(a).is_err());
        drop(again);
        assert!(l.admit_source(a).is_ok());
    }

    #[test]
    fn ipv6_sources_are_grouped_by_prefix() {
        let l = limits("max_connections_per_source = 1");
        let _a = l.admit_source(ip("2001:db8:1:2::1")).unwrap();
        // Same /64: shares the limit.
        assert!(l.admit_source(ip("2001:db8:1:2:ffff::9")).is_err());
        // Another /64: its own.
        let _b = l.admit_source(ip("2001:db8:1:3::1")).unwrap();
        // IPv4-mapped counts as the IPv4 address.
        let _c = l.admit_source(ip("192.0.2.1")).unwrap();
        assert!(l.admit_source(ip("::ffff:192.0.2.1")).is_err());

        let l48 = limits("max_connections_per_source = 1\nsource_prefix_v6 = 48");
        let _a = l48.admit_source(ip("2001:db8:1:2::1")).unwrap();
        assert!(l48.admit_source(ip("2001:db8:1:3::1")).is_err());
        assert!(l48.admit_source(ip("2001:db8:2::1")).is_ok());

        let l128 = limits("max_connections_per_source = 1\nsource_prefix_v6 = 128");
        let _a = l128.admit_source(ip("2001:db8:1:2::1")).unwrap();
        assert!(l128.admit_source(ip("2001:db8:1:2::2")).is_ok());
        assert!(l128.admit_source(ip("2001:db8:1:2::1")).is_err());
    }

    #[test]
    fn service_rate_bursts_one_second_then_holds_the_rate() {
        let l = limits("max_connection_rate = 100");
        let t0 = Duration::from_millis(5);
        let burst = (0..1000)
            .take_while(|_| l.admit_service_at(t0).is_ok())
            .count();
        assert_eq!(burst, 100, "a full bucket is one second's worth");
        assert_eq!(l.admit_service_at(t0), Err(Rejection::Rate));
        // Steady: one every 10 ms, none faster.
        let mut admitted = 0;
        for ms in 1..=2000u64 {
            let now = t0 + Duration::from_millis(ms);
            // Four attempts per millisecond: 4000/s offered.
            admitted += (0..4).filter(|_| l.admit_service_at(now).is_ok()).count();
        }
        assert_eq!(admitted, 200, "2 s at 100/s");
        // Idle for long: the bucket refills to one burst, not more.
        let later = t0 + 60 * SEC;
        let burst = (0..1000)
            .take_while(|_| l.admit_service_at(later).is_ok())
            .count();
        assert_eq!(burst, 100);
    }

    #[test]
    fn per_source_rate_bursts_then_holds_the_rate_per_source() {
        let l = limits("max_connection_rate_per_source = 50");
        let (a, b) = (ip("10.0.0.1"), ip("10.0.0.2"));
        let t0 = SEC;
        let burst = (0..1000)
            .take_while(|_| l.admit_source_at(a, t0).is_ok())
            .count();
        assert_eq!(burst, 50);
        assert_eq!(
            l.admit_source_at(a, t0).err(),
            Some(Rejection::RatePerSource)
        );
        // `b` has its own bucket.
        assert!(l.admit_source_at(b, t0).is_ok());
        let mut admitted = 0;
        for ms in 1..=1000u64 {
            let now = t0 + Duration::from_millis(ms);
            admitted += (0..3).filter(|_| l.admit_source_at(a, now).is_ok()).count();
        }
        assert_eq!(admitted, 50, "1 s at 50/s");
    }

    #[test]
    fn rate_and_count_combine_and_refused_attempts_take_no_token() {
        let l = limits("max_connections_per_source = 2\nmax_connection_rate_per_source = 5");
        let a = ip("10.0.0.1");
        let _h1 = l.admit_source_at(a, SEC).unwrap();
        let _h2 = l.admit_source_at(a, SEC).unwrap();
        // Over the count: refused (the rate token is spent: attempts are attempts).
        assert_eq!(l.admit_source_at(a, SEC).err(), Some(Rejection::PerSource));
        assert_eq!(l.admit_source_at(a, SEC).err(), Some(Rejection::PerSource));
        assert_eq!(l.admit_source_at(a, SEC).err(), Some(Rejection::PerSource));
        assert_eq!(
            l.admit_source_at(a, SEC).err(),
            Some(Rejection::RatePerSource)
        );
        // Refusals by rate took nothing: after 200 ms there is exactly one token.
        drop(_h1);
        let later = SEC + Duration::from_millis(200);
        assert!(l.admit_source_at(a, later).is_ok());
        assert_eq!(
            l.admit_source_at(a, later).err(),
            Some(Rejection::RatePerSource)
        );
    }

    /// Memory is fixed whatever the number of sources, and a fresh source is refused no more
    /// often than the module doc's bound, even with every slot an attacker can fill filled.
    #[test]
    fn distinct_source_flood_keeps_memory_fixed_and_fresh_sources_served() {
        let limit = 4;
        let l = limits(&format!(
            "max_connections = 10000\nmax_connections_per_source = {limit}"
        ));
        let bytes = l.table_bytes();
        assert_eq!(bytes, ROWS * 16384 * 16);
        // The worst an attacker without the key can do: `limit` connections from each of
        // open / limit sources, filling as many slots as possible.
        let mut held = Vec::new();
        for n in 0..2500u32 {
            let source = IpAddr::from((0x0a00_0000 + n).to_be_bytes());
            for _ in 0..limit {
                if let Ok(Some(h)) = l.admit_source(source) {
                    held.push(h);
                }
            }
        }
        // A flood of 100 000 distinct sources opening and closing: no growth.
        for n in 0..100_000u32 {
            let source = IpAddr::from((0x6400_0000 + n).to_be_bytes());
            drop(l.admit_source(source));
        }
        assert_eq!(l.table_bytes(), bytes);
        let open = held.len() as f64;
        let bound = (open / (f64::from(limit) * 16384.0)).powi(2);
        let trials = 4000u32;
        let refused = (0..trials)
            .filter(|n| {
                let source = IpAddr::from((0xc000_0000 + n).to_be_bytes());
                l.admit_source(source).is_err()
            })
            .count();
        // Binomial: the mean is at most trials × bound (about 2.3 % of 4000 = 93); allow
        // twice that plus slack, far below "everyone refused".
        let allowed = (2.0 * bound * f64::from(trials)) as usize + 20;
        assert!(
            refused <= allowed,
            "{refused} of {trials} fresh sources refused; bound {bound:.4} allows {allowed}"
        );
        drop(held);
        let table = l.table.as_ref().unwrap();
        assert!(table.slots.iter().all(|s| s.open.load(Relaxed) == 0));
    }

    #[test]
    fn tables_are_keyed_per_instance() {
        let (a, b) = (SourceTable::new(1 << 16), SourceTable::new(1 << 16));
        let same = (0..64u32)
            .filter(|&n| {
                let s = Source::V4(n);
                a.slots_of(s) == b.slots_of(s)
            })
            .count();
        assert!(same < 4, "{same} of 64 sources hashed alike under two keys");
    }

    #[test]
    fn concurrent_admits_and_releases_return_to_zero() {
        let l = limits("max_connections = 64\nmax_connections_per_source = 8");
        std::thread::scope(|s| {
            for t in 0..4u8 {
                let l = &l;
                s.spawn(move || {
                    let mut held = Vec::new();
                    for i in 0..20_000u32 {
                        let source = IpAddr::from([10, 0, 0, (i % 5) as u8]);
                        if let Ok(h) = l.admit_source(source) {
                            held.push(h);
                        }
                        if held.len() > 6 || (i + u32::from(t)) % 3 == 0 {
                            held.pop();
                        }
                    }
                });
            }
        });
        let table = l.table.as_ref().unwrap();
        assert!(table.slots.iter().all(|s| s.open.load(Relaxed) == 0));
    }

    #[test]
    fn reload_keeps_counts_and_applies_new_limits_to_new_connections() {
        let old = limits("max_connections_per_source = 2");
        let a = ip("10.0.0.1");
        let h1 = old.admit_source(a).unwrap();
        let h2 = old.admit_source(a).unwrap();
        // Raised: the old connections still count.
        let raised = SourceLimits::new(&config("max_connections_per_source = 3"), Some(&old));
        let h3 = raised.admit_source(a).unwrap();
        assert_eq!(raised.admit_source(a).err(), Some(Rejection::PerSource));
        // Turned off, then on again: still counted in between.
        let off = SourceLimits::new(&config(""), Some(&raised));
        let h4 = off.admit_source(a).unwrap();
        assert!(h4.is_some(), "counted while the limit is off");
        let lowered = SourceLimits::new(&config("max_connections_per_source = 1"), Some(&off));
        assert_eq!(lowered.open_estimate(a), 4);
        assert!(lowered.admit_source(a).is_err());
        drop(old);
        drop(raised);
        drop((h1, h2, h3, h4));
        assert_eq!(lowered.open_estimate(a), 0);
        let h = lowered.admit_source(a).unwrap();
        assert!(lowered.admit_source(a).is_err());
        drop(h);
        assert_eq!(lowered.open_estimate(a), 0);
    }

    #[test]
    fn reload_shares_the_service_rate_bucket() {
        let old = limits("max_connection_rate = 10");
        for _ in 0..10 {
            old.admit_service_at(SEC).unwrap();
        }
        let new = SourceLimits::new(&config("max_connection_rate = 20"), Some(&old));
        // The bucket is shared: emptied by the old generation, refilled at the new rate.
        assert!(new.admit_service_at(SEC).is_err());
        assert!(new
            .admit_service_at(SEC + Duration::from_millis(50))
            .is_ok());
    }

    #[test]
    fn a_refunded_service_token_can_be_taken_again() {
        let limits = limits("max_connection_rate = 2\n");
        let t = Duration::from_millis(10);
        assert!(limits.admit_service_at(t).is_ok());
        assert!(limits.admit_service_at(t).is_ok());
        assert_eq!(limits.admit_service_at(t), Err(Rejection::Rate));
        let rate = limits.service_rate.unwrap();
        rate.refund(&limits.shared.service_tat, nanos(t));
        assert!(limits.admit_service_at(t).is_ok());
        assert_eq!(limits.admit_service_at(t), Err(Rejection::Rate));
    }

    #[test]
    fn table_width_follows_max_connections_within_bounds() {
        assert_eq!(SourceTable::width_for(1), MIN_SLOTS_PER_ROW);
        assert_eq!(SourceTable::width_for(10_000), 16_384);
        assert_eq!(SourceTable::width_for(usize::MAX), MAX_SLOTS_PER_ROW);
    }

    #[test]
    fn datagram_rates_bound_each_source_and_the_service() {
        let rates = DatagramRates::new(Some(5), Some(3), 64, None);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let t = Duration::from_millis(1);
        let from_a: Vec<_> = (0..5).map(|_| rates.admit_at(a, t)).collect();
        assert_eq!(&from_a[..3], &[Ok(()), Ok(()), Ok(())]);
        assert_eq!(&from_a[3..], &[Err(RateExceeded::PerSource); 2]);
        // A's flood did not spend the service's rate: B still gets its burst.
        assert_eq!(rates.admit_at(b, t), Ok(()));
        assert_eq!(rates.admit_at(b, t), Ok(()));
        assert_eq!(rates.admit_at(b, t), Err(RateExceeded::Service));
        // A second later both have tokens again; a reload keeps the cells.
        let next = DatagramRates::new(Some(5), Some(3), 64, Some(&rates));
        assert_eq!(next.admit_at(a, t), Err(RateExceeded::PerSource));
        assert_eq!(next.admit_at(a, t + SEC), Ok(()));
        assert_eq!(next.table_bytes(), rates.table_bytes());
    }
}
