//! One sweep's walk over the trigger keys and the records: where it
//! stands between sweeps, what it makes of each key, and what it spends.

use std::collections::HashSet;
use std::fmt;

use super::{SweepReport, Trigger, TriggerLedger, Watch};
use crate::glob;
use crate::{Error, redis};

/// Which pass of a walk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Pass {
    /// `SCAN` over the trigger keys.
    Triggers,
    /// `SCAN` over the records, for triggers that went.
    Records,
}

/// Where a walk stands: kept in `<prefix>walk` between sweeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Walk {
    pub(super) pass: Pass,
    pub(super) cursor: u64,
}

impl Walk {
    pub(super) const START: Walk = Walk { pass: Pass::Triggers, cursor: 0 };

    pub(super) fn parse(text: &str) -> Option<Walk> {
        let (pass, cursor) = text.split_once(' ')?;
        let pass = match pass {
            "triggers" => Pass::Triggers,
            "records" => Pass::Records,
            _ => return None,
        };
        Some(Walk { pass, cursor: cursor.parse().ok()? })
    }
}

impl fmt::Display for Walk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let pass = match self.pass {
            Pass::Triggers => "triggers",
            Pass::Records => "records",
        };
        write!(f, "{pass} {}", self.cursor)
    }
}

/// What a sweep does with one trigger key it found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verdict {
    Act,
    Record,
    Unchanged,
}

/// A trigger key seen by the triggers pass: `value` is what it holds now,
/// `record` what the ledger holds for it.
fn judge(watch: Watch, established: bool, value: &[u8], record: Option<&[u8]>) -> Verdict {
    match record {
        None if established && watch.writes() => Verdict::Act,
        None => Verdict::Record,
        Some(seen) if watch.writes() && seen != value => Verdict::Act,
        Some(_) => Verdict::Unchanged,
    }
}

/// Whether the walk goes on, or stops here because a limit was reached
/// (the next sweep goes on from this place).
enum Step {
    Go,
    Stop,
}

/// Most keys per `mget` (the host's cap is 10,000; a triggers page reads
/// each key and its record).
const MGET_CHUNK: usize = 5_000;

/// Keep the walk's place every this many pages even when they held no
/// trigger: a sweep stopped by the host's budget (before the ledger's own
/// limits) then loses at most these, and the walk still moves on.
const SAVE_EVERY_PAGES: u32 = 8;

/// One sweep's walk: what it has spent and found so far.
pub(super) struct Walker<'a, F> {
    pub(super) ledger: &'a TriggerLedger,
    pub(super) act: F,
    /// The ledger was established (a first walk finished) when it began.
    pub(super) established: bool,
    /// Host calls spent by the ledger in this sweep.
    pub(super) calls: u32,
    /// Pages walked to their end in this sweep.
    pub(super) pages: u32,
    pub(super) report: SweepReport,
}

impl<F: FnMut(&Trigger) -> Result<(), Error>> Walker<'_, F> {
    /// Walk from `place` until the end, or until a limit stops it there.
    pub(super) fn run(&mut self, mut place: Walk) -> Result<(), Error> {
        let ledger = self.ledger;
        loop {
            if self.spent() {
                return self.keep(place);
            }
            let pattern = match place.pass {
                Pass::Triggers => ledger.triggers.as_str().to_owned(),
                Pass::Records => format!("{}*", glob::escape(&ledger.record_key(""))),
            };
            let page = self.call(|| redis::scan(place.cursor, &pattern, ledger.page_size))?;
            let mut seen = HashSet::new();
            // SCAN may return a key twice.
            let keys: Vec<String> = page.keys.into_iter().filter(|k| seen.insert(k.clone())).collect();
            let before = (self.report.acted, self.report.recorded, self.report.stale);
            let step = match place.pass {
                Pass::Triggers => self.triggers_page(&keys),
                Pass::Records => self.records_page(&keys),
            };
            match step {
                Ok(Step::Go) => {}
                // This page again next time: what was acted on is recorded.
                Ok(Step::Stop) => return self.keep(place),
                Err(e) => {
                    // Best effort, so that the work done counts.
                    let _ = redis::set_string(&ledger.walk_key(), &place.to_string(), None);
                    return Err(e);
                }
            }
            place.cursor = page.cursor;
            self.pages += 1;
            if place.cursor == 0 {
                if place.pass == Pass::Triggers && ledger.watch.removals() {
                    place = Walk { pass: Pass::Records, cursor: 0 };
                    continue;
                }
                return self.finish();
            }
            let worked = before != (self.report.acted, self.report.recorded, self.report.stale);
            if worked || self.pages.is_multiple_of(SAVE_EVERY_PAGES) {
                self.keep(place)?;
            }
        }
    }

    /// Whether the ledger's calls for this sweep are spent. Never before
    /// it moved the walk on (a page walked, a trigger recorded or acted
    /// on), or a limit lower than one page's cost would stop every sweep
    /// at the same place.
    fn spent(&self) -> bool {
        let moved = self.pages > 0 || self.report.recorded + self.report.acted + self.report.stale > 0;
        self.calls >= self.ledger.walk_calls && moved
    }

    /// One host call of the ledger's, counted.
    fn call<T>(&mut self, call: impl FnOnce() -> Result<T, Error>) -> Result<T, Error> {
        self.calls += 1;
        call()
    }

    /// Keep the walk's place in Redis for the next sweep.
    fn keep(&mut self, place: Walk) -> Result<(), Error> {
        let key = self.ledger.walk_key();
        self.call(|| redis::set_string(&key, &place.to_string(), None))
    }

    /// The walk reached its end: the next sweep starts a new one, and a
    /// first walk establishes the ledger.
    fn finish(&mut self) -> Result<(), Error> {
        let ledger = self.ledger;
        self.call(|| redis::del(&[ledger.walk_key()]))?;
        if !self.established {
            self.call(|| redis::set_string(&ledger.since_key(), &crate::clock::now_ms().to_string(), None))?;
        }
        self.report.finished = true;
        Ok(())
    }

    /// The triggers pass over one page of trigger keys.
    fn triggers_page(&mut self, keys: &[String]) -> Result<Step, Error> {
        let ledger = self.ledger;
        for chunk in keys.chunks(MGET_CHUNK) {
            let records: Vec<String> = chunk.iter().map(|k| ledger.record_key(k)).collect();
            // Under `Removals` the scan is proof enough that a key exists.
            let (values, records) = if ledger.watch.writes() {
                let mut both = self.call(|| redis::mget(&[chunk, &records[..]].concat()))?;
                let records = both.split_off(chunk.len());
                (both, records)
            } else {
                (vec![Some(Vec::new()); chunk.len()], self.call(|| redis::mget(&records))?)
            };
            for ((key, value), record) in chunk.iter().zip(values).zip(records) {
                // Gone since the scan, or not a string: the records pass
                // sees to keys that went.
                let Some(value) = value else { continue };
                let verdict = judge(ledger.watch, self.established, &value, record.as_deref());
                let trigger = Trigger { key: key.clone(), value: Some(value) };
                match verdict {
                    Verdict::Unchanged => self.report.unchanged += 1,
                    Verdict::Record if self.spent() => return Ok(Step::Stop),
                    Verdict::Record => {
                        self.call(|| ledger.settle(&trigger))?;
                        self.report.recorded += 1;
                    }
                    Verdict::Act => {
                        if let Step::Stop = self.hand_over(&trigger)? {
                            return Ok(Step::Stop);
                        }
                    }
                }
            }
        }
        Ok(Step::Go)
    }

    /// The records pass over one page of record keys.
    fn records_page(&mut self, records: &[String]) -> Result<Step, Error> {
        let ledger = self.ledger;
        let prefix = ledger.record_key("");
        let (mut keys, mut stale) = (Vec::new(), Vec::new());
        for record in records {
            match record.strip_prefix(&prefix).filter(|k| ledger.triggers.matches(k)) {
                Some(key) => keys.push(key.to_owned()),
                None => stale.push(record.clone()),
            }
        }
        if !stale.is_empty() {
            self.call(|| redis::del(&stale))?;
            self.report.stale += u32::try_from(stale.len()).unwrap_or(u32::MAX);
        }
        for chunk in keys.chunks(MGET_CHUNK) {
            let values = self.call(|| redis::mget(chunk))?;
            for (key, value) in chunk.iter().zip(values) {
                if value.is_some() {
                    continue;
                }
                // `MGET` reads other types as missing: ask before calling
                // a hash or a list gone.
                if self.spent() {
                    return Ok(Step::Stop);
                }
                if self.call(|| redis::exists(key))? {
                    continue;
                }
                if let Step::Stop = self.hand_over(&Trigger { key: key.clone(), value: None })? {
                    return Ok(Step::Stop);
                }
            }
        }
        Ok(Step::Go)
    }

    /// Hand one trigger to the policy and record it, unless this sweep
    /// has acted on as many as it may.
    fn hand_over(&mut self, trigger: &Trigger) -> Result<Step, Error> {
        if self.report.acted >= self.ledger.changes {
            return Ok(Step::Stop);
        }
        (self.act)(trigger)?;
        let ledger = self.ledger;
        self.call(|| ledger.settle(trigger))?;
        self.report.acted += 1;
        self.report.removed += u32::from(trigger.is_removed());
        Ok(Step::Go)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn walk_positions_round_trip_and_bad_ones_are_refused() {
        for walk in [Walk::START, Walk { pass: Pass::Records, cursor: 1 << 40 }] {
            assert_eq!(Walk::parse(&walk.to_string()), Some(walk));
        }
        for bad in ["", "triggers", "records x", "elsewhere 3", "triggers -1"] {
            assert_eq!(Walk::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn judging_a_trigger_against_its_record() {
        use Verdict::*;
        let v = b"2".as_slice();
        assert_eq!(judge(Watch::Writes, true, v, Some(b"1")), Act, "changed");
        assert_eq!(judge(Watch::Writes, true, v, Some(b"2")), Unchanged);
        assert_eq!(judge(Watch::Writes, true, v, None), Act, "new since the baseline");
        assert_eq!(judge(Watch::Writes, false, v, None), Record, "the first walk records a baseline");
        assert_eq!(judge(Watch::Writes, false, v, Some(b"1")), Act, "a record is a record, first walk or not");
        assert_eq!(judge(Watch::Removals, true, v, None), Record, "appearing is not what it watches");
        assert_eq!(judge(Watch::Removals, true, v, Some(b"")), Unchanged);
        assert_eq!(judge(Watch::WritesAndRemovals, true, v, Some(b"1")), Act);
    }
}
