//! tiktoken's byte-pair encoding over one vocabulary.
//!
//! A token's rank is its id, and a merge's priority is the rank of the
//! merged bytes: repeatedly merge the adjacent pair whose concatenation has
//! the lowest rank, the leftmost one on ties (tiktoken's `_byte_pair_merge`).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};

use rustc_hash::FxBuildHasher;

pub type Rank = u32;

const NO_RANK: Rank = Rank::MAX;

/// Pieces longer than this merge through a heap in O(n log n); shorter ones
/// use tiktoken's rescanning loop, which is faster for a handful of parts.
const HEAP_MERGE_MIN_LEN: usize = 128;

pub struct Vocab {
    /// Tokens of up to 7 bytes, packed with their length into a u64: one
    /// multiply to hash and one compare to match, for most lookups.
    short: HashMap<u64, Rank, FxBuildHasher>,
    long: HashMap<&'static [u8], Rank, FxBuildHasher>,
    tokens: Vec<&'static [u8]>,
}

#[inline(always)]
fn pack(bytes: &[u8]) -> u64 {
    debug_assert!(bytes.len() < 8);
    let mut buf = [0u8; 8];
    buf[..bytes.len()].copy_from_slice(bytes);
    buf[7] = bytes.len() as u8;
    u64::from_le_bytes(buf)
}

impl Vocab {
    /// Parses a `.tiktoken` file: one `base64(token) rank` per line, ranks
    /// 0, 1, 2, ... in order.
    pub fn parse(file: &[u8]) -> Result<Vocab, String> {
        let lines = file.split(|&b| b == b'\n').filter(|l| !l.is_empty());
        let mut arena = Vec::with_capacity(file.len());
        let mut spans = Vec::new();
        for (line_no, line) in lines.enumerate() {
            let mut fields = line.split(|&b| b == b' ');
            let (Some(token), Some(rank), None) = (fields.next(), fields.next(), fields.next())
            else {
                return Err(format!("line {}: expected `token rank`", line_no + 1));
            };
            let rank: usize = std::str::from_utf8(rank)
                .ok()
                .and_then(|r| r.parse().ok())
                .ok_or_else(|| format!("line {}: bad rank", line_no + 1))?;
            if rank != line_no {
                return Err(format!("line {}: rank {rank} out of order", line_no + 1));
            }
            let start = arena.len();
            decode_base64(token, &mut arena)
                .ok_or_else(|| format!("line {}: bad base64", line_no + 1))?;
            spans.push((start, arena.len()));
        }
        // The vocabulary lives for the whole process (it sits in a OnceLock),
        // so its bytes are leaked once to let the maps borrow them.
        let arena: &'static [u8] = Box::leak(arena.into_boxed_slice());
        let tokens: Vec<&'static [u8]> = spans.iter().map(|&(s, e)| &arena[s..e]).collect();
        let mut short = HashMap::with_capacity_and_hasher(tokens.len(), FxBuildHasher);
        let mut long = HashMap::with_capacity_and_hasher(tokens.len() / 2, FxBuildHasher);
        for (rank, &token) in tokens.iter().enumerate() {
            let rank = Rank::try_from(rank).map_err(|_| "too many tokens".to_string())?;
            let previous = if token.len() < 8 {
                short.insert(pack(token), rank)
            } else {
                long.insert(token, rank)
            };
            if previous.is_some() || token.is_empty() {
                return Err(format!("token {rank} is empty or repeated"));
            }
        }
        if (0..=255u8).any(|b| !short.contains_key(&pack(&[b]))) {
            return Err("not every single byte is a token".into());
        }
        Ok(Vocab {
            short,
            long,
            tokens,
        })
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    #[inline(always)]
    pub fn rank(&self, bytes: &[u8]) -> Option<Rank> {
        if bytes.len() < 8 {
            self.short.get(&pack(bytes)).copied()
        } else {
            self.long.get(bytes).copied()
        }
    }

    #[inline(always)]
    fn rank_or_none(&self, bytes: &[u8]) -> Rank {
        self.rank(bytes).unwrap_or(NO_RANK)
    }

    pub fn token_bytes(&self, rank: Rank) -> Option<&'static [u8]> {
        self.tokens.get(rank as usize).copied()
    }

    /// Number of tokens of one pre-tokenized piece.
    #[inline]
    pub fn count_piece(&self, piece: &[u8], scratch: &mut Vec<(usize, Rank)>) -> usize {
        if piece.len() == 1 || self.rank(piece).is_some() {
            return 1;
        }
        if piece.len() >= HEAP_MERGE_MIN_LEN {
            return self.heap_merge(piece).len();
        }
        self.merge(piece, scratch);
        scratch.len() - 1
    }

    /// Appends the tokens of one pre-tokenized piece.
    pub fn encode_piece(
        &self,
        piece: &[u8],
        out: &mut Vec<Rank>,
        scratch: &mut Vec<(usize, Rank)>,
    ) {
        if let Some(rank) = self.rank(piece) {
            out.push(rank);
            return;
        }
        let mut push = |start: usize, end: usize| {
            out.push(
                self.rank(&piece[start..end])
                    .expect("merged parts are tokens"),
            );
        };
        if piece.len() >= HEAP_MERGE_MIN_LEN {
            let starts = self.heap_merge(piece);
            for (k, &start) in starts.iter().enumerate() {
                push(start, starts.get(k + 1).copied().unwrap_or(piece.len()));
            }
        } else {
            self.merge(piece, scratch);
            for pair in scratch.windows(2) {
                push(pair[0].0, pair[1].0);
            }
        }
    }

    /// tiktoken's merge loop: leaves in `parts` the start of every final
    /// part plus a sentinel at `piece.len()`, each with the rank of the pair
    /// it starts.
    fn merge(&self, piece: &[u8], parts: &mut Vec<(usize, Rank)>) {
        parts.clear();
        let mut min = (NO_RANK, usize::MAX);
        for i in 0..piece.len() - 1 {
            let rank = self.rank_or_none(&piece[i..i + 2]);
            if rank < min.0 {
                min = (rank, i);
            }
            parts.push((i, rank));
        }
        parts.push((piece.len() - 1, NO_RANK));
        parts.push((piece.len(), NO_RANK));

        // The rank of part i merged with part i + 1, read before part i + 1
        // is removed (hence i + 3).
        let pair_rank = |parts: &[(usize, Rank)], i: usize| {
            if i + 3 < parts.len() {
                self.rank_or_none(&piece[parts[i].0..parts[i + 3].0])
            } else {
                NO_RANK
            }
        };
        while min.0 != NO_RANK {
            let i = min.1;
            if i > 0 {
                parts[i - 1].1 = pair_rank(parts, i - 1);
            }
            parts[i].1 = pair_rank(parts, i);
            parts.remove(i + 1);

            min = (NO_RANK, usize::MAX);
            for (k, &(_, rank)) in parts[..parts.len() - 1].iter().enumerate() {
                if rank < min.0 {
                    min = (rank, k);
                }
            }
        }
    }

    /// The same merges in the same order, driven by a heap keyed by
    /// (rank, start) so the lowest rank and then the leftmost pair pops
    /// first. Entries go stale when a neighbour merges; an entry is current
    /// iff its start is still a part whose pair has that rank (ranks name
    /// byte strings uniquely, so an equal rank is the same pair). Returns
    /// the start of every final part.
    fn heap_merge(&self, piece: &[u8]) -> Vec<usize> {
        let n = piece.len();
        // next[i]: start of the part after the part starting at i.
        let mut next: Vec<usize> = (1..=n).collect();
        let mut prev: Vec<usize> = (0..n).map(|i| i.wrapping_sub(1)).collect();
        let mut pair: Vec<Rank> = vec![NO_RANK; n];
        let mut heap = BinaryHeap::with_capacity(n);
        for i in 0..n - 1 {
            pair[i] = self.rank_or_none(&piece[i..i + 2]);
            if pair[i] != NO_RANK {
                heap.push(Reverse((pair[i], i)));
            }
        }
        let end_of = |next: &[usize], i: usize| if i < n { next[i] } else { n };
        while let Some(Reverse((rank, i))) = heap.pop() {
            if pair[i] != rank {
                continue;
            }
            let absorbed = next[i];
            let after = end_of(&next, absorbed);
            next[i] = after;
            pair[absorbed] = NO_RANK;
            if after < n {
                prev[after] = i;
                pair[i] = self.rank_or_none(&piece[i..end_of(&next, after)]);
                if pair[i] != NO_RANK {
                    heap.push(Reverse((pair[i], i)));
                }
            } else {
                pair[i] = NO_RANK;
            }
            if i > 0 {
                let p = prev[i];
                pair[p] = self.rank_or_none(&piece[p..after]);
                if pair[p] != NO_RANK {
                    heap.push(Reverse((pair[p], p)));
                }
            }
        }
        let mut starts = Vec::new();
        let mut i = 0;
        while i < n {
            starts.push(i);
            i = next[i];
        }
        starts
    }
}

/// Standard base64 with padding, appended to `out`; None on bad input.
fn decode_base64(input: &[u8], out: &mut Vec<u8>) -> Option<()> {
    fn value(c: u8) -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    }
    if !input.len().is_multiple_of(4) {
        return None;
    }
    for chunk in input.chunks(4) {
        let pad = chunk.iter().rev().take_while(|&&c| c == b'=').count();
        if pad > 2 {
            return None;
        }
        let mut acc = 0u32;
        for &c in &chunk[..4 - pad] {
            acc = (acc << 6) | value(c)?;
        }
        acc <<= 6 * pad as u32;
        let bytes = [(acc >> 16) as u8, (acc >> 8) as u8, acc as u8];
        out.extend_from_slice(&bytes[..3 - pad]);
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A toy vocabulary: all single bytes, then the given merges in rank order.
    fn toy(merges: &[&str]) -> Vocab {
        let mut file = String::new();
        let mut rank = 0;
        let mut line = |bytes: &[u8]| {
            file.push_str(&encode_base64(bytes));
            file.push_str(&format!(" {rank}\n"));
            rank += 1;
        };
        for b in 0..=255u8 {
            line(&[b]);
        }
        for m in merges {
            line(m.as_bytes());
        }
        Vocab::parse(file.as_bytes()).unwrap()
    }

    fn encode_base64(bytes: &[u8]) -> String {
        const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut s = String::new();
        for chunk in bytes.chunks(3) {
            let mut b = [0u8; 3];
            b[..chunk.len()].copy_from_slice(chunk);
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for k in 0..4 {
                if k <= chunk.len() {
                    s.push(ALPHABET[((n >> (18 - 6 * k)) & 63) as usize] as char);
                } else {
                    s.push('=');
                }
            }
        }
        s
    }

    fn encode(v: &Vocab, piece: &str) -> Vec<String> {
        let mut out = Vec::new();
        v.encode_piece(piece.as_bytes(), &mut out, &mut Vec::new());
        out.iter()
            .map(|&r| String::from_utf8(v.token_bytes(r).unwrap().to_vec()).unwrap())
            .collect()
    }

    #[test]
    fn base64_round_trips() {
        for len in 0..10 {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 37 + 200) as u8).collect();
            let mut out = Vec::new();
            decode_base64(encode_base64(&bytes).as_bytes(), &mut out).unwrap();
            assert_eq!(out, bytes);
        }
        assert!(decode_base64(b"a===", &mut Vec::new()).is_none());
        assert!(decode_base64(b"ab!d", &mut Vec::new()).is_none());
    }

    #[test]
    fn lowest_rank_merges_first() {
        // "bc" outranks "ab", so "abc" -> "a" + "bc", not "ab" + "c".
        let v = toy(&["bc", "ab"]);
        assert_eq!(encode(&v, "abc"), ["a", "bc"]);
        let v = toy(&["ab", "bc"]);
        assert_eq!(encode(&v, "abc"), ["ab", "c"]);
    }

    #[test]
    fn ties_merge_leftmost_first() {
        // "aaa": both pairs are "aa" (same rank): the left one merges.
        let v = toy(&["aa"]);
        assert_eq!(encode(&v, "aaa"), ["aa", "a"]);
        let v = toy(&["aa", "aaaa"]);
        assert_eq!(encode(&v, "aaaaa"), ["aaaa", "a"]);
    }

    #[test]
    fn merges_chain_into_longer_tokens() {
        let v = toy(&["lo", "low", "er", "lower", "es", "est"]);
        assert_eq!(encode(&v, "lowest"), ["low", "est"]);
        assert_eq!(encode(&v, "lowerlower"), ["lower", "lower"]);
        assert_eq!(v.count_piece(b"lowerlower", &mut Vec::new()), 2);
    }

    #[test]
    fn heap_merge_agrees_with_the_rescanning_loop() {
        let v = toy(&[
            "ab", "ba", "aa", "aba", "bab", "abab", "aab", "bb", "abba", "baab",
        ]);
        let mut seed = 12345u64;
        for len in 2..300 {
            let piece: Vec<u8> = (0..len)
                .map(|_| {
                    seed = seed
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    if (seed >> 33).is_multiple_of(3) {
                        b'b'
                    } else {
                        b'a'
                    }
                })
                .collect();
            let mut parts = Vec::new();
            v.merge(&piece, &mut parts);
            let loop_starts: Vec<usize> = parts[..parts.len() - 1].iter().map(|p| p.0).collect();
            assert_eq!(v.heap_merge(&piece), loop_starts, "len {len}");
        }
    }

    #[test]
    fn rejects_malformed_files() {
        assert!(Vocab::parse(b"YQ== 1\n").is_err());
        assert!(Vocab::parse(b"YQ==\n").is_err());
        assert!(Vocab::parse(b"YQ== 0\n").is_err(), "missing single bytes");
    }
}
