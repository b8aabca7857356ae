//! Hand-written scanners equal to tiktoken's two pre-tokenizer regexes.
//!
//! tiktoken runs these regexes through fancy-regex's backtracking engine,
//! which is most of its encoding time. Each scanner here returns the end of
//! the piece that `find_iter` would return at a position: alternatives are
//! tried in order and the first that matches wins, exactly as a backtracking
//! engine does, with each alternative's backtracking worked out by hand in
//! the comments. Both regexes match at every position, so the pieces tile
//! the text and a scanner only needs the piece's end.
//!
//! cl100k_base:
//! `'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+|
//!  ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s`
//!
//! o200k_base:
//! `[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|
//!  [^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|
//!  \p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+`

use super::unicode::{
    char_at, is, ClassSet, CASED_LOWER, CASED_UPPER, LETTER, LETTER_OR_MARK, NEWLINE, NUMBER,
    PUNCT, WHITESPACE, WORD_PREFIX,
};

/// The two pre-tokenizers, as a type so the counting loops monomorphise.
pub trait PreTokenizer {
    /// End of the piece starting at `i` (`i < bytes.len()`, on a char
    /// boundary of valid UTF-8).
    fn piece_end(bytes: &[u8], i: usize) -> usize;
}

pub struct Cl100k;
pub struct O200k;

impl PreTokenizer for Cl100k {
    #[inline]
    fn piece_end(bytes: &[u8], i: usize) -> usize {
        cl100k_piece_end(bytes, i)
    }
}

impl PreTokenizer for O200k {
    #[inline]
    fn piece_end(bytes: &[u8], i: usize) -> usize {
        o200k_piece_end(bytes, i)
    }
}

/// The pieces of `text`, for tests and callers that want them.
pub fn pieces<P: PreTokenizer>(text: &str) -> Vec<&str> {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let end = P::piece_end(bytes, i);
        out.push(&text[i..end]);
        i = end;
    }
    out
}

/// End of the longest run of characters in `set` from `p`.
#[inline(always)]
fn run(bytes: &[u8], mut p: usize, set: ClassSet) -> usize {
    while p < bytes.len() {
        let (class, len) = char_at(bytes, p);
        if !is(class, set) {
            break;
        }
        p += len;
    }
    p
}

/// End of the longest run of the ASCII bytes in `accept` from `p`.
#[inline(always)]
fn byte_run(bytes: &[u8], mut p: usize, accept: &[u8]) -> usize {
    while p < bytes.len() && accept.contains(&bytes[p]) {
        p += 1;
    }
    p
}

#[inline(always)]
fn class_at(bytes: &[u8], p: usize) -> Option<(u8, usize)> {
    (p < bytes.len()).then(|| char_at(bytes, p))
}

/// `\p{N}{1,3}` from `i`, whose first character is a number.
#[inline]
fn numbers(bytes: &[u8], i: usize) -> usize {
    let mut p = i;
    for _ in 0..3 {
        match class_at(bytes, p) {
            Some((NUMBER, len)) => p += len,
            _ => break,
        }
    }
    p
}

/// Byte length of `'(?i:[sdmt]|ll|ve|re)` at `i`, 0 when it does not match.
///
/// Case-insensitive matching uses Unicode simple case folding, under which
/// the only non-ASCII member of these letters' classes is U+017F LATIN SMALL
/// LETTER LONG S (it folds to `s`); a test checks that against regex-syntax.
#[inline]
fn contraction_len(bytes: &[u8], i: usize) -> usize {
    debug_assert_eq!(bytes[i], b'\'');
    let lower = |k: usize| bytes.get(i + k).map(|b| b | 0x20);
    match lower(1) {
        Some(b's' | b'd' | b'm' | b't') => 2,
        Some(b'l') if lower(2) == Some(b'l') => 3,
        Some(b'v') if lower(2) == Some(b'e') => 3,
        Some(b'r') if lower(2) == Some(b'e') => 3,
        _ if bytes.get(i + 1..i + 3) == Some("\u{17f}".as_bytes()) => 3,
        _ => 0,
    }
}

/// The whitespace run from `i`: its end, the end of its last `\r`/`\n` if
/// any, and the start of its last character.
#[inline]
fn whitespace_run(bytes: &[u8], i: usize) -> (usize, Option<usize>, usize) {
    let mut p = i;
    let mut last_newline_end = None;
    let mut last_start = i;
    while let Some((class, len)) = class_at(bytes, p) {
        if !is(class, WHITESPACE) {
            break;
        }
        if class == NEWLINE {
            last_newline_end = Some(p + len);
        }
        last_start = p;
        p += len;
    }
    (p, last_newline_end, last_start)
}

pub fn cl100k_piece_end(bytes: &[u8], i: usize) -> usize {
    let (class, len) = char_at(bytes, i);
    let next = i + len;
    if bytes[i] == b'\'' {
        let n = contraction_len(bytes, i);
        if n > 0 {
            return i + n;
        }
    }
    if is(class, LETTER) {
        // `[^\r\n\p{L}\p{N}]?+` cannot take a letter, so this is `\p{L}++`.
        return run(bytes, next, LETTER);
    }
    if class == NUMBER {
        return numbers(bytes, i);
    }
    if is(class, WORD_PREFIX) {
        if let Some((following, flen)) = class_at(bytes, next) {
            // `[^\r\n\p{L}\p{N}]?+\p{L}++`: the possessive prefix is kept only
            // when a letter follows it.
            if is(following, LETTER) {
                return run(bytes, next + flen, LETTER);
            }
            // ` ?[^\s\p{L}\p{N}]++[\r\n]*+` with the space taken.
            if bytes[i] == b' ' && is(following, PUNCT) {
                let end = run(bytes, next + flen, PUNCT);
                return byte_run(bytes, end, b"\r\n");
            }
        }
        if is(class, PUNCT) {
            let end = run(bytes, next, PUNCT);
            return byte_run(bytes, end, b"\r\n");
        }
    }
    let (end, newline_end, last_start) = whitespace_run(bytes, i);
    if end == bytes.len() {
        // `\s++$`
        end
    } else if let Some(newline_end) = newline_end {
        // `\s*[\r\n]` backtracks from the run's end to its last newline.
        newline_end
    } else if last_start > i {
        // `\s+(?!\S)` gives back the character before the non-space.
        last_start
    } else {
        // `\s`
        end
    }
}

pub fn o200k_piece_end(bytes: &[u8], i: usize) -> usize {
    let (class, len) = char_at(bytes, i);
    let next = i + len;
    let prefix = is(class, WORD_PREFIX);
    if is(class, LETTER_OR_MARK)
        || (prefix && class_at(bytes, next).is_some_and(|(c, _)| is(c, LETTER_OR_MARK)))
    {
        return o200k_word(bytes, i, next, class);
    }
    if class == NUMBER {
        return numbers(bytes, i);
    }
    // ` ?[^\s\p{L}\p{N}]+[\r\n/]*`
    let punct_start = if bytes[i] == b' ' {
        class_at(bytes, next).and_then(|(c, l)| is(c, PUNCT).then_some(next + l))
    } else if is(class, PUNCT) {
        Some(next)
    } else {
        None
    };
    if let Some(start) = punct_start {
        let end = run(bytes, start, PUNCT);
        return byte_run(bytes, end, b"\r\n/");
    }
    let (end, newline_end, last_start) = whitespace_run(bytes, i);
    if let Some(newline_end) = newline_end {
        // `\s*[\r\n]+` backtracks from the run's end to its last newline.
        newline_end
    } else if end == bytes.len() || last_start == i {
        // `\s+(?!\S)` at the end of the text, or `\s+` of one character.
        end
    } else {
        // `\s+(?!\S)` gives back the character before the non-space.
        last_start
    }
}

/// o200k's two word alternatives, when at least one can match: the
/// character at `i` is a letter or mark, or a possible prefix followed by
/// one. Order of attempts, as the backtracking engine makes them: the first
/// alternative with the optional prefix taken, then without it, then the
/// second alternative likewise.
#[inline]
fn o200k_word(bytes: &[u8], i: usize, next: usize, class: u8) -> usize {
    let prefix = is(class, WORD_PREFIX);
    let starts_word = is(class, LETTER_OR_MARK);
    let end = (prefix.then(|| upper_then_lower(bytes, next)).flatten())
        .or_else(|| starts_word.then(|| upper_then_lower(bytes, i)).flatten())
        .or_else(|| {
            prefix
                .then(|| upper_then_maybe_lower(bytes, next))
                .flatten()
        })
        .or_else(|| {
            starts_word
                .then(|| upper_then_maybe_lower(bytes, i))
                .flatten()
        })
        .expect("a letter or mark always matches one word alternative");
    if bytes.get(end) == Some(&b'\'') {
        end + contraction_len(bytes, end)
    } else {
        end
    }
}

/// `[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+` from `p`.
///
/// The greedy upper run stops at `q`; if a lower character follows, the
/// lower run takes it and its followers. Otherwise the engine gives back
/// upper characters one at a time until the lower class can take one:
/// the last character of the upper run that is also lower (Lm, Lo, M),
/// which then ends the match.
#[inline]
fn upper_then_lower(bytes: &[u8], p: usize) -> Option<usize> {
    let mut q = p;
    let mut last_lower_end = None;
    while let Some((class, len)) = class_at(bytes, q) {
        if !is(class, CASED_UPPER) {
            if is(class, CASED_LOWER) {
                return Some(run(bytes, q + len, CASED_LOWER));
            }
            break;
        }
        if is(class, CASED_LOWER) {
            last_lower_end = Some(q + len);
        }
        q += len;
    }
    last_lower_end
}

/// `[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*` from `p`.
#[inline]
fn upper_then_maybe_lower(bytes: &[u8], p: usize) -> Option<usize> {
    let q = run(bytes, p, CASED_UPPER);
    (q > p).then(|| run(bytes, q, CASED_LOWER))
}

#[cfg(test)]
mod tests;
