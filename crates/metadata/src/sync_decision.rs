//! Which side holds the latest data, decided from the generation
//! identifiers alone, in the manner of DRBD's UUID comparison.
//!
//! A node starts a new `current` generation when it writes without its peer
//! and remembers the one it left as `bitmap`: its dirty bitmap holds exactly
//! what changed since. So when one side's `bitmap` is the other's `current`,
//! the first is newer and a differential resync of the bitmaps suffices.
//! When both left the same generation, both wrote: split brain. When a side
//! only finds the other's generation in its older history, the bitmap that
//! would bound the difference is gone: full resync. Timing and node names
//! never enter into it.

use crate::superblock::{Flags, Generations, GENERATION_JUST_CREATED};

/// What one side knows about itself at connect time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SideState {
    pub generations: Generations,
    pub flags: Flags,
}

impl SideState {
    /// Whether this side holds a valid data set: not a resync target cut
    /// off (Inconsistent), nor a new disk, whatever its flags.
    fn is_consistent(&self) -> bool {
        self.flags.contains(Flags::CONSISTENT) && !self.generations.is_just_created()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncDecision {
    /// Same generation: nothing to copy beyond what either bitmap holds.
    InSync,
    /// This side is newer; the peer needs the union of both bitmaps.
    SourceDifferential,
    /// The peer is newer; this side needs the union of both bitmaps.
    TargetDifferential,
    /// The peer needs everything (it is new, or shares only old history).
    SourceFull,
    /// This side needs everything.
    TargetFull,
    /// Both sides wrote since they parted: never merged automatically.
    SplitBrain,
    /// The two sides share no generation at all.
    Unrelated,
    /// Neither side has ever held valid data: one must be promoted first.
    BothNew,
    /// What the generations say would copy from, or take as in sync, data
    /// that is not Consistent (a resync to it was cut off): the operator
    /// says which side to keep, with a forced promotion.
    NoConsistentSource,
}

impl SyncDecision {
    /// The same decision seen from the peer.
    pub fn mirrored(self) -> SyncDecision {
        match self {
            SyncDecision::SourceDifferential => SyncDecision::TargetDifferential,
            SyncDecision::TargetDifferential => SyncDecision::SourceDifferential,
            SyncDecision::SourceFull => SyncDecision::TargetFull,
            SyncDecision::TargetFull => SyncDecision::SourceFull,
            other => other,
        }
    }
}

fn known(g: &Generations) -> impl Iterator<Item = u64> + '_ {
    [g.current, g.bitmap, g.history[0], g.history[1]]
        .into_iter()
        .filter(|&id| id != GENERATION_JUST_CREATED)
}

/// Decides, from `local`'s point of view, how the two sides relate.
pub fn decide(local: &SideState, peer: &SideState) -> SyncDecision {
    let decision = decide_by_generations(local, peer);
    // A side whose resync was cut off (Inconsistent) holds no valid data,
    // whatever its generations say: it is never a source, and what it
    // wrote before it became a target is not a split brain any more (the
    // target of a resolved split brain may have lost power before it
    // recorded the end, after the source had). A consistent side that
    // shares history with it copies everything.
    let consistent = SideState::is_consistent;
    let decision = match (consistent(local), consistent(peer), decision) {
        (
            true,
            false,
            SyncDecision::TargetDifferential | SyncDecision::TargetFull | SyncDecision::SplitBrain,
        ) => SyncDecision::SourceFull,
        (
            false,
            true,
            SyncDecision::SourceDifferential | SyncDecision::SourceFull | SyncDecision::SplitBrain,
        ) => SyncDecision::TargetFull,
        _ => decision,
    };
    // Nor is it ever copied to a new disk, taken for in sync, or set
    // against the other side's changes when neither side is Consistent.
    let from_inconsistent = match decision {
        SyncDecision::SourceDifferential | SyncDecision::SourceFull => !consistent(local),
        SyncDecision::TargetDifferential | SyncDecision::TargetFull => !consistent(peer),
        SyncDecision::InSync | SyncDecision::SplitBrain => !consistent(local) || !consistent(peer),
        SyncDecision::Unrelated | SyncDecision::BothNew | SyncDecision::NoConsistentSource => false,
    };
    if from_inconsistent {
        SyncDecision::NoConsistentSource
    } else {
        decision
    }
}

/// `decide`, from the generation identifiers (and, within one generation,
/// the flags that say which side may hold more).
fn decide_by_generations(local: &SideState, peer: &SideState) -> SyncDecision {
    let (l, p) = (&local.generations, &peer.generations);
    match (l.is_just_created(), p.is_just_created()) {
        (true, true) => return SyncDecision::BothNew,
        (true, false) => return SyncDecision::TargetFull,
        (false, true) => return SyncDecision::SourceFull,
        (false, false) => {}
    }
    if l.current == p.current {
        // Same data generation. A resync target that was cut off before the
        // source said it was done is Inconsistent still, even when nothing
        // is left to copy: the consistent side is the source.
        match (local.is_consistent(), peer.is_consistent()) {
            (true, false) => return SyncDecision::SourceDifferential,
            (false, true) => return SyncDecision::TargetDifferential,
            _ => {}
        }
        // A primary that crashed may have written
        // (within its activity log) what the other never got: it is the
        // source. If both crashed as primary, neither can be preferred.
        let crashed = |s: &SideState| s.flags.contains(Flags::CRASHED_PRIMARY);
        return match (crashed(local), crashed(peer)) {
            (true, false) => SyncDecision::SourceDifferential,
            (false, true) => SyncDecision::TargetDifferential,
            (true, true) => SyncDecision::SplitBrain,
            (false, false) => SyncDecision::InSync,
        };
    }
    if l.bitmap != 0 && l.bitmap == p.bitmap {
        return SyncDecision::SplitBrain;
    }
    let local_moved_on = l.bitmap != 0 && l.bitmap == p.current;
    let peer_moved_on = p.bitmap != 0 && p.bitmap == l.current;
    match (local_moved_on, peer_moved_on) {
        (true, false) => return SyncDecision::SourceDifferential,
        (false, true) => return SyncDecision::TargetDifferential,
        // Each claims to have left the other's generation: a history that
        // cannot happen, so nothing is trusted.
        (true, true) => return SyncDecision::SplitBrain,
        (false, false) => {}
    }
    let in_history = |id: u64, g: &Generations| g.history.contains(&id);
    let local_newer = in_history(p.current, l);
    let peer_newer = in_history(l.current, p);
    match (local_newer, peer_newer) {
        (true, false) => SyncDecision::SourceFull,
        (false, true) => SyncDecision::TargetFull,
        _ if known(l).any(|id| known(p).any(|other| other == id)) => SyncDecision::SplitBrain,
        _ => SyncDecision::Unrelated,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn side(current: u64, bitmap: u64, history: [u64; 2]) -> SideState {
        SideState {
            generations: Generations {
                current,
                bitmap,
                history,
            },
            flags: Flags::CONSISTENT | Flags::UP_TO_DATE,
        }
    }

    /// Checks the decision from both ends: they must agree.
    fn check(local: SideState, peer: SideState, expected: SyncDecision) {
        assert_eq!(decide(&local, &peer), expected, "local view");
        assert_eq!(decide(&peer, &local), expected.mirrored(), "peer view");
    }

    #[test]
    fn decision_table() {
        use SyncDecision::*;
        let new = side(GENERATION_JUST_CREATED, 0, [0, 0]);
        // A fresh pair, and a fresh peer of a volume with data.
        check(new, new, BothNew);
        check(side(10, 0, [0, 0]), new, SourceFull);
        // Connected and identical.
        check(side(10, 0, [0, 0]), side(10, 0, [0, 0]), InSync);
        // The primary wrote alone: generation 11 from base 10.
        check(
            side(11, 10, [0, 0]),
            side(10, 0, [0, 0]),
            SourceDifferential,
        );
        // ...and again, after an earlier round: older history does not confuse it.
        check(
            side(12, 11, [10, 0]),
            side(11, 10, [0, 0]),
            SourceDifferential,
        );
        // Both wrote from base 10.
        check(side(11, 10, [0, 0]), side(12, 10, [0, 0]), SplitBrain);
        // The peer's generation survives only in old history: full copy.
        check(side(13, 12, [10, 0]), side(10, 0, [0, 0]), SourceFull);
        // Diverged long ago: common history, no line from one to the other.
        check(side(21, 20, [10, 0]), side(31, 30, [10, 0]), SplitBrain);
        // Each side claims to descend from the other: impossible, so refused.
        check(side(1, 3, [0, 0]), side(3, 1, [0, 0]), SplitBrain);
        // Nothing in common.
        check(side(5, 4, [3, 2]), side(9, 8, [7, 6]), Unrelated);
    }

    /// A side from drawn identifiers (current, bitmap, history), crashed as
    /// primary or not, Inconsistent or not.
    fn drawn(ids: [u64; 4], crashed: bool, inconsistent: bool) -> SideState {
        let mut s = side(ids[0], ids[1], [ids[2], ids[3]]);
        s.flags.set(Flags::CRASHED_PRIMARY, crashed);
        s.flags
            .set(Flags::CONSISTENT | Flags::UP_TO_DATE, !inconsistent);
        s
    }

    proptest::proptest! {
        /// Both ends always reach the same verdict, whatever the identifiers
        /// (drawn from a small pool so that they collide often).
        #[test]
        fn both_ends_agree(a in proptest::array::uniform4(0u64..6), b in proptest::array::uniform4(0u64..6), ca: bool, cb: bool, ia: bool, ib: bool) {
            let (left, right) = (drawn(a, ca, ia), drawn(b, cb, ib));
            proptest::prop_assert_eq!(decide(&left, &right), decide(&right, &left).mirrored());
        }

        /// Beside a consistent side, an inconsistent one is never the
        /// source, nor a party to a split brain.
        #[test]
        fn an_inconsistent_side_is_never_a_source(a in proptest::array::uniform4(0u64..6), b in proptest::array::uniform4(0u64..6), crashed: bool) {
            let consistent = side(a[0], a[1], [a[2], a[3]]);
            let mut cut_off = side(b[0], b[1], [b[2], b[3]]);
            cut_off.flags.remove(Flags::CONSISTENT | Flags::UP_TO_DATE);
            cut_off.flags.set(Flags::CRASHED_PRIMARY, crashed);
            let decision = decide(&cut_off, &consistent);
            proptest::prop_assert!(
                !matches!(decision, SyncDecision::SourceDifferential | SyncDecision::SourceFull | SyncDecision::SplitBrain),
                "{:?}", decision
            );
        }

        /// Whatever both sides' generations and flags, a source is
        /// Consistent, and so are two sides taken for in sync.
        #[test]
        fn a_source_is_always_consistent(a in proptest::array::uniform4(0u64..6), b in proptest::array::uniform4(0u64..6), ca: bool, cb: bool, ia: bool, ib: bool) {
            let (left, right) = (drawn(a, ca, ia), drawn(b, cb, ib));
            let consistent = |s: &SideState| {
                s.flags.contains(Flags::CONSISTENT) && !s.generations.is_just_created()
            };
            let decision = decide(&left, &right);
            let fine = match decision {
                SyncDecision::SourceDifferential | SyncDecision::SourceFull => consistent(&left),
                SyncDecision::TargetDifferential | SyncDecision::TargetFull => consistent(&right),
                SyncDecision::InSync => consistent(&left) && consistent(&right),
                _ => true,
            };
            proptest::prop_assert!(fine, "{:?} from {:?} and {:?}", decision, left, right);
        }
    }

    /// A split brain resolved with beta as the victim: alpha, the source,
    /// recorded the end (its bitmap generation is history now) and beta
    /// lost power before it did. Beta's generations still say it wrote
    /// apart, but its data is half alpha's: alpha copies everything, and
    /// no policy that counts changes can pick alpha as the victim.
    #[test]
    fn a_split_brain_target_cut_off_after_the_source_finished_is_the_target() {
        let alpha = side(11, 0, [10, 0]);
        let mut beta = side(12, 10, [0, 0]);
        check(alpha, beta, SyncDecision::SplitBrain);
        beta.flags.remove(Flags::CONSISTENT | Flags::UP_TO_DATE);
        check(alpha, beta, SyncDecision::SourceFull);
        // Cut off before either recorded it: the same.
        check(side(11, 10, [0, 0]), beta, SyncDecision::SourceFull);
        // Two inconsistent sides: nothing to copy from.
        let mut alpha = alpha;
        alpha.flags.remove(Flags::CONSISTENT | Flags::UP_TO_DATE);
        check(alpha, beta, SyncDecision::NoConsistentSource);
    }

    /// A new disk beside an Inconsistent one (a resync to it was cut off,
    /// say by its source's disk failing, which was then replaced) takes
    /// nothing from it; nor do two Inconsistent sides of one generation
    /// pass for in sync.
    #[test]
    fn inconsistent_data_is_never_copied_nor_in_sync() {
        let mut new = side(GENERATION_JUST_CREATED, 0, [0, 0]);
        new.flags = Flags::CLEAN_SHUTDOWN;
        let mut cut_off = side(10, 0, [0, 0]);
        cut_off.flags.remove(Flags::CONSISTENT | Flags::UP_TO_DATE);
        check(new, cut_off, SyncDecision::NoConsistentSource);
        check(cut_off, cut_off, SyncDecision::NoConsistentSource);
        let mut dirty_crash = cut_off;
        dirty_crash.flags.insert(Flags::CRASHED_PRIMARY);
        check(dirty_crash, cut_off, SyncDecision::NoConsistentSource);
    }

    #[test]
    fn a_crashed_primary_is_the_source() {
        let mut crashed = side(10, 0, [0, 0]);
        crashed.flags.insert(Flags::CRASHED_PRIMARY);
        check(
            crashed,
            side(10, 0, [0, 0]),
            SyncDecision::SourceDifferential,
        );
        check(crashed, crashed, SyncDecision::SplitBrain);
    }

    #[test]
    fn an_inconsistent_side_of_the_same_generation_is_the_target() {
        let mut cut_off = side(10, 0, [0, 0]);
        cut_off.flags.remove(Flags::CONSISTENT | Flags::UP_TO_DATE);
        check(
            side(10, 0, [0, 0]),
            cut_off,
            SyncDecision::SourceDifferential,
        );
        let mut crashed = side(10, 0, [0, 0]);
        crashed.flags.insert(Flags::CRASHED_PRIMARY);
        check(crashed, cut_off, SyncDecision::SourceDifferential);
    }
}
