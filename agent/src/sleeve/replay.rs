//! Weave's sleeve replay window.
//!
//! Sequence numbers (63 bits) are split into windows of 2^20. The state keeps a bitset
//! for the current window and one for the previous window. A number in a newer window
//! moves the state forward: one window ahead keeps the old current set as the previous
//! one; a jump over more than one window starts both sets empty. A number in the
//! previous window is checked against the previous set, except before the first move
//! (there is no previous set yet, so it is dropped). Anything older, or already seen, is
//! a replay. The window moves before the duplicate check, as Weave does; the caller
//! runs this only for datagrams whose authenticator checked.
//!
//! The bitsets are allocated on first use (128 KiB of address space each), grow within
//! that up to the highest offset seen, and keep their allocation across window moves.

/// Bits of a window.
pub const WINDOW_BITS: u32 = 20;

const WORDS: usize = (1 << WINDOW_BITS) / 64;

#[derive(Debug, Clone, Default)]
struct BitSet(Vec<u64>);

impl BitSet {
    fn contains(&self, i: usize) -> bool {
        self.0.get(i / 64).is_some_and(|w| w & (1 << (i % 64)) != 0)
    }

    fn insert(&mut self, i: usize) {
        let word = i / 64;
        if word >= self.0.len() {
            if self.0.capacity() == 0 {
                // One allocation for the whole window (128 KiB of address space; the
                // kernel backs only the pages touched), so growing never reallocates
                // on the receive path.
                self.0.reserve_exact(WORDS);
            }
            self.0.resize(word + 1, 0);
        }
        self.0[word] |= 1 << (i % 64);
    }

    fn clear(&mut self) {
        self.0.clear();
    }
}

/// The replay state of one (DF or non-DF) stream of a sleeve connection.
#[derive(Debug, Clone, Default)]
pub struct ReplayWindow {
    current_window: u64,
    current: BitSet,
    previous: BitSet,
    has_previous: bool,
}

impl ReplayWindow {
    /// A fresh state (window 0, nothing seen).
    pub fn new() -> Self {
        Self::default()
    }

    /// Records `seq` (the top bit, the DF flag, is ignored) and tells whether it is new.
    /// `false` means: drop the datagram as a replay (or too old).
    pub fn check_and_record(&mut self, seq: u64) -> bool {
        let seq = seq & !(1 << 63);
        let offset = (seq & ((1 << WINDOW_BITS) - 1)) as usize;
        let window = seq >> WINDOW_BITS;
        let set = if window == self.current_window {
            &mut self.current
        } else if window + 1 == self.current_window {
            if !self.has_previous {
                return false;
            }
            &mut self.previous
        } else if window < self.current_window {
            return false;
        } else {
            if window == self.current_window + 1 {
                std::mem::swap(&mut self.current, &mut self.previous);
                self.current.clear();
            } else {
                self.current.clear();
                self.previous.clear();
            }
            self.has_previous = true;
            self.current_window = window;
            &mut self.current
        };
        if set.contains(offset) {
            return false;
        }
        set.insert(offset);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: u64 = 1 << WINDOW_BITS;

    #[test]
    fn in_order_and_duplicates() {
        let mut r = ReplayWindow::new();
        for s in 0..1000 {
            assert!(r.check_and_record(s), "{s}");
        }
        for s in 0..1000 {
            assert!(!r.check_and_record(s), "dup {s}");
        }
    }

    #[test]
    fn out_of_order_within_window() {
        let mut r = ReplayWindow::new();
        assert!(r.check_and_record(10));
        assert!(r.check_and_record(3));
        assert!(r.check_and_record(W - 1));
        assert!(!r.check_and_record(3));
        assert!(r.check_and_record(0));
    }

    #[test]
    fn df_bit_is_ignored() {
        let mut r = ReplayWindow::new();
        assert!(r.check_and_record(5 | (1 << 63)));
        assert!(!r.check_and_record(5));
    }

    #[test]
    fn previous_window_before_any_move_is_dropped() {
        // Weave has no previous set until the window first moves.
        let mut r = ReplayWindow::new();
        assert!(r.check_and_record(W + 1)); // moves to window 1; previous = old current.
        assert!(r.check_and_record(7)); // window 0 is the previous window now.
        assert!(!r.check_and_record(7));
    }

    #[test]
    fn jump_by_one_keeps_previous() {
        let mut r = ReplayWindow::new();
        assert!(r.check_and_record(5));
        assert!(r.check_and_record(W + 5));
        // 5 was seen in what is now the previous window.
        assert!(!r.check_and_record(5));
        assert!(r.check_and_record(6));
        assert!(!r.check_and_record(W + 5));
        // Same offset in the new window is a different number.
        assert!(r.check_and_record(W + 6));
        // Another move: window 0 becomes too old.
        assert!(r.check_and_record(2 * W));
        assert!(!r.check_and_record(9));
        assert!(!r.check_and_record(W + 6));
        assert!(r.check_and_record(W + 7));
    }

    #[test]
    fn jump_by_more_than_one_resets_both() {
        let mut r = ReplayWindow::new();
        assert!(r.check_and_record(5));
        assert!(r.check_and_record(W + 5));
        assert!(r.check_and_record(3 * W + 1));
        // Window 2 is the previous window, empty after the reset: accepted once.
        assert!(r.check_and_record(2 * W + 5));
        assert!(!r.check_and_record(2 * W + 5));
        // Windows 0 and 1 are too old.
        assert!(!r.check_and_record(W + 6));
        assert!(!r.check_and_record(6));
        assert!(!r.check_and_record(3 * W + 1));
    }

    #[test]
    fn huge_jump_and_max_sequence() {
        let mut r = ReplayWindow::new();
        let max = (1u64 << 63) - 1;
        assert!(r.check_and_record(max));
        assert!(!r.check_and_record(max));
        assert!(!r.check_and_record(0));
        assert!(r.check_and_record(max - 1));
        // The previous window of the last one.
        assert!(r.check_and_record(max - W));
    }

    #[test]
    fn exhaustive_small_model() {
        // Compare against a straightforward model over a pseudo-random walk that crosses
        // windows forwards and backwards.
        let mut r = ReplayWindow::new();
        let mut seen = std::collections::HashSet::new();
        let mut cur: u64 = 0;
        let mut has_prev = false;
        let mut x: u64 = 0x1234_5678;
        for _ in 0..20000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let w = (x >> 3) % 6;
            let seq = w * W + (x % 8);
            let win = seq / W;
            let expect = if win > cur {
                if win > cur + 1 {
                    seen.retain(|_: &u64| false);
                } else {
                    seen.retain(|s: &u64| s / W == cur);
                }
                cur = win;
                has_prev = true;
                seen.insert(seq)
            } else if win == cur || (win + 1 == cur && has_prev) {
                seen.insert(seq)
            } else {
                false
            };
            assert_eq!(r.check_and_record(seq), expect, "seq {seq}");
        }
    }
}
