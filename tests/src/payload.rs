//! The payload pod-app sends: a deterministic byte stream, so the sender, the echo checker and a
//! packet sniffer all know what the bytes are without storing them.

/// A deterministic byte stream (xorshift64*), so sender and checker agree without storing it.
/// Bytes come out in the same order however the caller slices them.
pub struct Stream {
    state: u64,
    word: [u8; 8],
    used: usize,
}

impl Stream {
    /// Returns the stream of `seed` (every seed gives a different stream).
    pub fn new(seed: u64) -> Self {
        Stream { state: seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1, word: [0; 8], used: 8 }
    }

    fn next_word(&mut self) -> [u8; 8] {
        self.state ^= self.state >> 12;
        self.state ^= self.state << 25;
        self.state ^= self.state >> 27;
        self.state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes()
    }

    /// Fills `buf` with the stream's next bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        let mut at = 0;
        while at < buf.len() {
            if self.used == 8 {
                if buf.len() - at >= 8 {
                    let word = self.next_word();
                    buf[at..at + 8].copy_from_slice(&word);
                    at += 8;
                    continue;
                }
                self.word = self.next_word();
                self.used = 0;
            }
            let n = (8 - self.used).min(buf.len() - at);
            buf[at..at + n].copy_from_slice(&self.word[self.used..self.used + n]);
            self.used += n;
            at += n;
        }
    }
}

/// Returns the first `len` bytes of the stream of `seed`.
pub fn prefix(seed: u64, len: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; len];
    Stream::new(seed).fill(&mut bytes);
    bytes
}

/// A seeded block repeated forever: what `pod-app send` streams to `pod-app sink` for
/// throughput runs. Sending and checking it costs a `memcmp`, not a generator, so the measured
/// rate is the path's, not the test app's; the block's odd length never lines up with buffer
/// sizes, so a lost, repeated or reordered chunk shows as a mismatch.
pub struct Pattern {
    block: Vec<u8>,
}

impl Pattern {
    /// The block's length: 1 MiB and 13 bytes.
    pub const LEN: usize = (1 << 20) + 13;

    /// Returns the pattern of `seed`.
    pub fn new(seed: u64) -> Self {
        let mut block = vec![0u8; Self::LEN];
        Stream::new(seed).fill(&mut block);
        Pattern { block }
    }

    /// Returns the pattern's bytes from stream offset `offset` to the end of the block (at most
    /// `max` of them): what to send next.
    pub fn chunk(&self, offset: u64, max: usize) -> &[u8] {
        let at = (offset % Self::LEN as u64) as usize;
        let end = (at + max).min(Self::LEN);
        &self.block[at..end]
    }

    /// Returns whether `data` is the pattern's bytes at stream offset `offset`.
    pub fn matches(&self, offset: u64, data: &[u8]) -> bool {
        let mut offset = offset;
        let mut rest = data;
        while !rest.is_empty() {
            let expected = self.chunk(offset, rest.len());
            if rest[..expected.len()] != *expected {
                return false;
            }
            rest = &rest[expected.len()..];
            offset += expected.len() as u64;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::{Pattern, Stream};

    #[test]
    fn the_pattern_repeats_and_catches_lost_or_altered_bytes() {
        let pattern = Pattern::new(3);
        let len = Pattern::LEN as u64;
        let mut sent = Vec::new();
        let mut offset = 0u64;
        while offset < 3 * len {
            let chunk = pattern.chunk(offset, 100_000);
            sent.extend_from_slice(chunk);
            offset += chunk.len() as u64;
        }
        assert!(pattern.matches(0, &sent));
        assert!(pattern.matches(len - 5, &sent[(len - 5) as usize..(len + 500) as usize]), "across the wrap");
        assert!(!pattern.matches(1, &sent[..1000]), "a lost byte");
        let mut altered = sent[..4096].to_vec();
        altered[4000] ^= 1;
        assert!(!pattern.matches(0, &altered), "a flipped bit");
        assert!(!Pattern::new(4).matches(0, &sent[..64]), "another seed");
    }

    #[test]
    fn stream_is_the_same_however_it_is_sliced() {
        let mut whole = vec![0u8; 1000];
        Stream::new(7).fill(&mut whole);
        let mut sliced = Vec::new();
        let mut s = Stream::new(7);
        for n in [3usize, 1, 8, 13, 64, 5, 906] {
            let mut part = vec![0u8; n];
            s.fill(&mut part);
            sliced.extend(part);
        }
        assert_eq!(whole, sliced);
    }
}
