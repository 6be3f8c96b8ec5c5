//! Random topics and filters for the brute-force tests of the router and the retained
//! store, from a seeded xorshift64: reproducible runs without a `rand` dependency.

use crate::mqtt::topic::TopicName;

/// Marsaglia's xorshift64; plenty for picking test levels, never for anything secret.
pub(crate) struct XorShift(u64);

impl XorShift {
    /// A generator from a non-zero seed (xorshift stays at zero forever).
    pub(crate) fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }

    /// The next 64 random bits.
    pub(crate) fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// A number in `0..bound` (`bound` > 0), slightly biased, which tests do not mind.
    pub(crate) fn below(&mut self, bound: usize) -> usize {
        (self.next_u64() % bound as u64) as usize
    }

    /// One element of `items`.
    pub(crate) fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// The levels the brute-force tests build topics and filters from: few enough that matches
/// are common, with an empty level and a `$` level.
pub(crate) const LEVELS: [&str; 4] = ["a", "b", "", "$s"];

/// A topic of one to four levels over [`LEVELS`].
pub(crate) fn random_topic(rng: &mut XorShift) -> TopicName {
    loop {
        let depth = 1 + rng.below(4);
        let levels: Vec<&str> = (0..depth).map(|_| *rng.pick(&LEVELS)).collect();
        if let Ok(name) = TopicName::parse(&levels.join("/")) {
            return name;
        }
    }
}

/// A filter of up to four levels over [`LEVELS`] and `+`, possibly followed by `#` (alone
/// included, which is what tests the `$` rule for `#`).
pub(crate) fn random_filter(rng: &mut XorShift) -> String {
    loop {
        let depth = rng.below(5);
        let mut levels: Vec<&str> = (0..depth)
            .map(|_| match rng.below(6) {
                0 | 1 => "+",
                _ => *rng.pick(&LEVELS),
            })
            .collect();
        if depth == 0 || rng.below(3) == 0 {
            levels.push("#");
        }
        let filter = levels.join("/");
        if !filter.is_empty() {
            return filter;
        }
    }
}
