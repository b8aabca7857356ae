//! The Unicode character classes the two pre-tokenizer regexes use, as one
//! small class number per code point.
//!
//! tiktoken's regexes are compiled by fancy-regex over regex-syntax's tables
//! (regex-syntax 0.8.11 = Unicode 16.0.0 in tiktoken 0.14), so the table is
//! generated from exactly those tables and a test compares all 1,114,112
//! code points against them. Regenerate it after a tiktoken upgrade with
//! `TOLLWAY_REGEN_UNICODE=1 cargo test -p tollway_core unicode_table`.

/// Not whitespace, letter, number or mark: punctuation, symbols, controls.
pub const OTHER: u8 = 0;
/// `\s` (White_Space) other than `\r` and `\n`.
pub const SPACE: u8 = 1;
/// `\p{N}`.
pub const NUMBER: u8 = 2;
/// `\p{Lu}` or `\p{Lt}`.
pub const UPPER: u8 = 3;
/// `\p{Ll}`.
pub const LOWER: u8 = 4;
/// `\p{Lm}` or `\p{Lo}`: on both sides of o200k's case split.
pub const MODIFIER_OR_OTHER_LETTER: u8 = 5;
/// `\p{M}`.
pub const MARK: u8 = 6;
/// `\r` or `\n`, which several alternatives single out.
pub const NEWLINE: u8 = 7;

/// A set of classes as a bit mask, tested with [`is`].
pub type ClassSet = u8;

const fn set(classes: &[u8]) -> ClassSet {
    let mut mask = 0;
    let mut i = 0;
    while i < classes.len() {
        mask |= 1 << classes[i];
        i += 1;
    }
    mask
}

/// `\p{L}`.
pub const LETTER: ClassSet = set(&[UPPER, LOWER, MODIFIER_OR_OTHER_LETTER]);
/// `\s`.
pub const WHITESPACE: ClassSet = set(&[SPACE, NEWLINE]);
/// `[^\s\p{L}\p{N}]`: the punctuation runs of both regexes.
pub const PUNCT: ClassSet = set(&[OTHER, MARK]);
/// `[^\r\n\p{L}\p{N}]`: the optional one-character prefix of a word.
pub const WORD_PREFIX: ClassSet = set(&[OTHER, MARK, SPACE]);
/// o200k's `[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]`.
pub const CASED_UPPER: ClassSet = set(&[UPPER, MODIFIER_OR_OTHER_LETTER, MARK]);
/// o200k's `[\p{Ll}\p{Lm}\p{Lo}\p{M}]`.
pub const CASED_LOWER: ClassSet = set(&[LOWER, MODIFIER_OR_OTHER_LETTER, MARK]);
/// Either side of o200k's case split: `\p{L}` or `\p{M}`.
pub const LETTER_OR_MARK: ClassSet = CASED_UPPER | CASED_LOWER;

#[inline(always)]
pub const fn is(class: u8, set: ClassSet) -> bool {
    (set >> class) & 1 != 0
}

const STAGE1_SHIFT: u32 = 7;
const STAGE1_LEN: usize = 0x110000 >> STAGE1_SHIFT;
const BLOCK_MASK: usize = (1 << STAGE1_SHIFT) - 1;

/// `[stage1: one block number per 128 code points][stage2: 128 classes per
/// distinct block]`, written by the generator test below.
static TABLE: &[u8] = include_bytes!("../../data/unicode_classes.bin");

static ASCII: [u8; 128] = {
    let mut t = [OTHER; 128];
    let mut b = 0;
    while b < 128 {
        let c = b as u8;
        t[b] = if c == b'\r' || c == b'\n' {
            NEWLINE
        } else if c == b' ' || (c >= 0x09 && c <= 0x0d) {
            SPACE
        } else if c.is_ascii_digit() {
            NUMBER
        } else if c.is_ascii_uppercase() {
            UPPER
        } else if c.is_ascii_lowercase() {
            LOWER
        } else {
            OTHER
        };
        b += 1;
    }
    t
};

#[inline]
pub fn class_of(cp: u32) -> u8 {
    let cp = cp as usize;
    if cp < 128 {
        return ASCII[cp];
    }
    let block = TABLE[cp >> STAGE1_SHIFT] as usize;
    TABLE[STAGE1_LEN + (block << STAGE1_SHIFT) + (cp & BLOCK_MASK)]
}

/// Class and byte length of the character starting at `i` of valid UTF-8.
#[inline(always)]
pub fn char_at(bytes: &[u8], i: usize) -> (u8, usize) {
    let b0 = bytes[i];
    if b0 < 0x80 {
        return (ASCII[b0 as usize], 1);
    }
    decode_non_ascii(bytes, i)
}

#[inline]
fn decode_non_ascii(bytes: &[u8], i: usize) -> (u8, usize) {
    let b0 = bytes[i] as u32;
    let cont = |k: usize| (bytes[i + k] & 0x3f) as u32;
    let (cp, len) = if b0 < 0xe0 {
        (((b0 & 0x1f) << 6) | cont(1), 2)
    } else if b0 < 0xf0 {
        (((b0 & 0x0f) << 12) | (cont(1) << 6) | cont(2), 3)
    } else {
        (
            ((b0 & 0x07) << 18) | (cont(1) << 12) | (cont(2) << 6) | cont(3),
            4,
        )
    };
    (class_of(cp), len)
}

/// The code point ranges regex-syntax compiles a class pattern to.
#[cfg(test)]
fn ranges(pattern: &str) -> Vec<(u32, u32)> {
    use regex_syntax::hir::{Class, HirKind};

    let hir = regex_syntax::parse(pattern).unwrap();
    match hir.kind() {
        HirKind::Class(Class::Unicode(c)) => c
            .ranges()
            .iter()
            .map(|r| (r.start() as u32, r.end() as u32))
            .collect(),
        other => panic!("{pattern} is not a class: {other:?}"),
    }
}

/// Classes of every code point, from regex-syntax's own tables.
#[cfg(test)]
fn reference_classes() -> Vec<u8> {
    let mut classes = vec![OTHER; 0x110000];
    let sources = [
        (r"\s", SPACE),
        (r"\p{N}", NUMBER),
        (r"[\p{Lu}\p{Lt}]", UPPER),
        (r"\p{Ll}", LOWER),
        (r"[\p{Lm}\p{Lo}]", MODIFIER_OR_OTHER_LETTER),
        (r"\p{M}", MARK),
        (r"[\r\n]", NEWLINE),
    ];
    for (pattern, class) in sources {
        for (start, end) in ranges(pattern) {
            for cp in start..=end {
                let slot = &mut classes[cp as usize];
                // \r and \n are the only overlap (they are \s too).
                assert!(*slot == OTHER || class == NEWLINE, "{cp:x} in two classes");
                *slot = class;
            }
        }
    }
    // The letter classes partition \p{L}.
    let letters: usize = ranges(r"\p{L}")
        .iter()
        .map(|(a, b)| (b - a + 1) as usize)
        .sum();
    assert_eq!(letters, classes.iter().filter(|&&c| is(c, LETTER)).count());
    classes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build_table(classes: &[u8]) -> Vec<u8> {
        let mut stage1 = Vec::with_capacity(STAGE1_LEN);
        let mut blocks: Vec<&[u8]> = Vec::new();
        for block in classes.chunks(1 << STAGE1_SHIFT) {
            let index = match blocks.iter().position(|b| *b == block) {
                Some(i) => i,
                None => {
                    blocks.push(block);
                    blocks.len() - 1
                }
            };
            stage1.push(u8::try_from(index).expect("more than 256 distinct blocks"));
        }
        stage1.extend(blocks.concat());
        stage1
    }

    #[test]
    fn unicode_table_matches_regex_syntax() {
        let reference = reference_classes();
        if std::env::var_os("TOLLWAY_REGEN_UNICODE").is_some() {
            let path = concat!(env!("CARGO_MANIFEST_DIR"), "/data/unicode_classes.bin");
            std::fs::write(path, build_table(&reference)).unwrap();
            return;
        }
        // class_of reads the ASCII table below 128, so this checks both.
        for (cp, &want) in reference.iter().enumerate() {
            assert_eq!(class_of(cp as u32), want, "code point {cp:#x}");
        }
    }

    #[test]
    fn contraction_letters_fold_as_the_scanner_assumes() {
        // pretokenize's contraction_len folds ASCII case and knows one
        // non-ASCII letter, U+017F; that is all regex-syntax folds them to.
        for letter in ['s', 'd', 'm', 't', 'l', 'v', 'e', 'r'] {
            let mut want = vec![letter.to_ascii_uppercase() as u32, letter as u32];
            if letter == 's' {
                want.push(0x17f);
            }
            let got: Vec<u32> = ranges(&format!("(?i:{letter})"))
                .iter()
                .flat_map(|&(a, b)| a..=b)
                .collect();
            assert_eq!(got, want, "{letter}");
        }
    }

    #[test]
    fn decodes_every_utf8_length() {
        let s = "a\u{e9}\u{4e2d}\u{1f600}\u{301}";
        let b = s.as_bytes();
        assert_eq!(char_at(b, 0), (LOWER, 1));
        assert_eq!(char_at(b, 1), (LOWER, 2));
        assert_eq!(char_at(b, 3), (MODIFIER_OR_OTHER_LETTER, 3));
        assert_eq!(char_at(b, 6), (OTHER, 4));
        assert_eq!(char_at(b, 10), (MARK, 2));
    }
}
