//! Split brain: both nodes wrote since they parted. By default it is
//! refused and waits for the operator; the operator (`connect
//! --discard-my-data`) or an opt-in `after-sb-0pri` policy may name the side
//! whose changes go. Decided from both Hellos alone, so both nodes agree.

use blkmirror_config::AfterSplitBrain;

/// What a side's Hello says that matters here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Side {
    /// The operator asked this side to give up its changes.
    pub discard_my_data: bool,
    pub primary: bool,
    /// It became primary while the two were apart.
    pub promoted_apart: bool,
    /// Bytes it marked as changed.
    pub dirty_bytes: u64,
}

/// The side whose changes are thrown away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Victim {
    Local,
    Remote,
}

/// Names the victim of a split brain, or `None` when nothing decides and
/// the operator must.
pub fn victim(
    policy: AfterSplitBrain,
    local: &Side,
    remote: &Side,
) -> Result<Option<Victim>, String> {
    match (local.discard_my_data, remote.discard_my_data) {
        (true, true) => {
            return Err("both nodes were told to discard their data: tell only one".into())
        }
        (true, false) => return Ok(Some(Victim::Local)),
        (false, true) => return Ok(Some(Victim::Remote)),
        (false, false) => {}
    }
    // The policies apply only while neither side is primary.
    if local.primary || remote.primary {
        return Ok(None);
    }
    // The side for which `loses` holds and not for the other.
    let pick = |loses: fn(&Side, &Side) -> bool| match (loses(local, remote), loses(remote, local))
    {
        (true, false) => Some(Victim::Local),
        (false, true) => Some(Victim::Remote),
        _ => None,
    };
    Ok(match policy {
        AfterSplitBrain::Disconnect => None,
        AfterSplitBrain::DiscardZeroChanges => pick(|me, _| me.dirty_bytes == 0),
        AfterSplitBrain::DiscardYoungerPrimary => pick(|me, _| me.promoted_apart),
        AfterSplitBrain::DiscardLeastChanges => {
            pick(|me, other| me.dirty_bytes < other.dirty_bytes)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn side(dirty_bytes: u64) -> Side {
        Side {
            discard_my_data: false,
            primary: false,
            promoted_apart: false,
            dirty_bytes,
        }
    }

    #[test]
    fn the_operator_names_the_victim_whatever_the_policy() {
        let mut mine = side(10);
        mine.discard_my_data = true;
        for policy in [
            AfterSplitBrain::Disconnect,
            AfterSplitBrain::DiscardLeastChanges,
        ] {
            assert_eq!(victim(policy, &mine, &side(0)), Ok(Some(Victim::Local)));
            assert_eq!(victim(policy, &side(0), &mine), Ok(Some(Victim::Remote)));
        }
        assert!(victim(AfterSplitBrain::Disconnect, &mine, &mine).is_err());
    }

    #[test]
    fn by_default_nothing_is_thrown_away() {
        assert_eq!(
            victim(AfterSplitBrain::Disconnect, &side(0), &side(9)),
            Ok(None)
        );
    }

    #[test]
    fn policies() {
        use AfterSplitBrain::*;
        assert_eq!(
            victim(DiscardZeroChanges, &side(0), &side(9)),
            Ok(Some(Victim::Local))
        );
        assert_eq!(victim(DiscardZeroChanges, &side(4), &side(9)), Ok(None));
        assert_eq!(
            victim(DiscardLeastChanges, &side(9), &side(4)),
            Ok(Some(Victim::Remote))
        );
        assert_eq!(victim(DiscardLeastChanges, &side(4), &side(4)), Ok(None));
        let mut younger = side(9);
        younger.promoted_apart = true;
        assert_eq!(
            victim(DiscardYoungerPrimary, &younger, &side(1)),
            Ok(Some(Victim::Local))
        );
        assert_eq!(victim(DiscardYoungerPrimary, &younger, &younger), Ok(None));
    }

    #[test]
    fn policies_never_overrule_a_primary() {
        let mut primary = side(9);
        primary.primary = true;
        assert_eq!(
            victim(AfterSplitBrain::DiscardZeroChanges, &side(0), &primary),
            Ok(None)
        );
    }
}
