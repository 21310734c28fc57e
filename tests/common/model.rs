//! The sequential model of the lock table that the pipelined and the property tests check the
//! server against, reply by reply: what each of `g`, `r`, `i`, `sg`, `sr` and `si` answers, and
//! what a disconnect orphans.

use std::collections::{BTreeMap, BTreeSet};

/// The commands the model answers.
pub const VERBS: [&str; 6] = ["g", "r", "i", "sg", "sr", "si"];

/// The lock table as one connection after another would see it. `H` names a holder: a test
/// picks what tells its connections apart (a label, or a generation number when a replacement
/// connection must be a new holder).
pub struct Model<H> {
    /// Exclusive locks and their holder.
    exclusive: BTreeMap<String, H>,
    /// Shared locks and their holders; a name with no holder left is removed.
    shared: BTreeMap<String, BTreeSet<H>>,
    /// Exclusive locks released by a disconnect, as the server counts `orphans`.
    pub orphans: u64,
    /// Shared locks released by a disconnect, counted per lock (`shared_orphans`).
    pub shared_orphans: u64,
}

impl<H> Default for Model<H> {
    fn default() -> Self {
        Model {
            exclusive: BTreeMap::new(),
            shared: BTreeMap::new(),
            orphans: 0,
            shared_orphans: 0,
        }
    }
}

impl<H: Ord + Copy> Model<H> {
    /// Applies `verb name` from `who` and returns the server's exact reply.
    pub fn apply(&mut self, who: H, verb: &str, name: &str) -> String {
        match verb {
            "g" => match self.exclusive.get(name) {
                Some(&holder) if holder != who => "0 Cannot Get Lock\n".into(),
                _ => {
                    self.exclusive.insert(name.into(), who);
                    "1 Got Lock\n".into()
                }
            },
            "r" if self.exclusive.get(name) == Some(&who) => {
                self.exclusive.remove(name);
                "1 Released Lock\n".into()
            }
            "r" => "0 Cannot Release Lock\n".into(),
            "i" if self.exclusive.contains_key(name) => "1 Locked\n".into(),
            "i" => "0 Not Locked\n".into(),
            "sg" => {
                let holders = self.shared.entry(name.into()).or_default();
                holders.insert(who);
                format!("{} Got Shared Lock\n", holders.len())
            }
            "sr" => {
                let released = self.shared.get_mut(name).is_some_and(|h| h.remove(&who));
                self.shared.retain(|_, h| !h.is_empty());
                if released {
                    "1 Released Shared Lock\n".into()
                } else {
                    "0 Cannot Release Shared Lock\n".into()
                }
            }
            "si" => match self.shared.get(name).map_or(0, |h| h.len()) {
                0 => "0 Not Shared Locked\n".into(),
                n => format!("{n} Shared Locked\n"),
            },
            _ => unreachable!("the model answers only {VERBS:?}, not {verb:?}"),
        }
    }

    /// `who` goes away: every lock it held is released and counted as orphaned.
    pub fn disconnect(&mut self, who: H) {
        let before = self.exclusive.len();
        self.exclusive.retain(|_, holder| *holder != who);
        self.orphans += (before - self.exclusive.len()) as u64;
        for holders in self.shared.values_mut() {
            if holders.remove(&who) {
                self.shared_orphans += 1;
            }
        }
        self.shared.retain(|_, h| !h.is_empty());
    }

    /// Names locked exclusively now, as `q` counts `locks`.
    pub fn locks(&self) -> u64 {
        self.exclusive.len() as u64
    }

    /// Names with at least one shared holder now, as `q` counts `shared_locks`.
    pub fn shared_locks(&self) -> u64 {
        self.shared.len() as u64
    }
}
