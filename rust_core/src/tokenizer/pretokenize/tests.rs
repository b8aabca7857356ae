//! The scanners against fancy-regex 0.19 (the engine tiktoken 0.14 is built
//! with) running tiktoken's own patterns.

use super::*;

const CL100K_PATTERN: &str = r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s";
const O200K_PATTERN: &str = concat!(
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",
);

fn reference<'t>(re: &fancy_regex::Regex, text: &'t str) -> Vec<&'t str> {
    re.find_iter(text).map(|m| m.unwrap().as_str()).collect()
}

fn regexes() -> (fancy_regex::Regex, fancy_regex::Regex) {
    (
        fancy_regex::Regex::new(CL100K_PATTERN).unwrap(),
        fancy_regex::Regex::new(O200K_PATTERN).unwrap(),
    )
}

fn check(cl: &fancy_regex::Regex, o200: &fancy_regex::Regex, text: &str) {
    assert_eq!(
        pieces::<Cl100k>(text),
        reference(cl, text),
        "cl100k: {text:?}"
    );
    assert_eq!(
        pieces::<O200k>(text),
        reference(o200, text),
        "o200k: {text:?}"
    );
}

const CORPUS: &[&str] = &[
    "",
    "Hello, world! This is a test.",
    "I'M they'Ve We'RE it'S you'LL I'd he's 'tis 'sup rock'n'roll",
    "x'\u{17f} '\u{17f}a don'\u{17f}t O'NEIL'S",
    "hello   world\t\ttab\r\nwindows\n\n\nunix  \n  \n",
    "trailing spaces   ",
    "\n  ",
    "a\n  ",
    "   \u{a0}\u{3000}x \u{2003}y\u{85}z\u{2028}w",
    "12345 1,234,567.89 3.14159 \u{661}\u{662}\u{663}\u{664} \u{216b}\u{216c} x\u{b2} \u{bd} \u{ff11}\u{ff12}",
    "def f(x):\n    return {'a': [1, 2, 3]}  # comment\n",
    "{\"key\": \"value\", \"n\": null, \"list\": [true, false]}\n",
    "path/to/file.rs // comment /* block */ a//b ;\n/\n//",
    "\u{4e2d}\u{6587}\u{6587}\u{672c}\u{3002}\u{65e5}\u{672c}\u{8a9e}\u{306e}\u{30c6}\u{30ad}\u{30b9}\u{30c8}",
    "\u{627}\u{644}\u{639}\u{64e}\u{631}\u{64e}\u{628}\u{650}\u{64a}\u{651}\u{629} \u{645}\u{631}\u{62d}\u{628}\u{627}",
    "\u{939}\u{93f}\u{902}\u{926}\u{940} \u{92d}\u{93e}\u{937}\u{93e} \u{915}\u{94d}\u{937}",
    "\u{41f}\u{440}\u{438}\u{432}\u{435}\u{442}, \u{41c}\u{418}\u{420}! \u{416}\u{436}",
    "e\u{301}\u{301} E\u{301}X \u{301}ABC \u{301}abc .\u{301}x ..\u{301}x \u{301}",
    "\u{1f600}\u{1f469}\u{200d}\u{1f4bb} \u{1f3f3}\u{fe0f}\u{200d}\u{1f308} \u{1f44d}\u{1f3fd}",
    "\u{1c5}a \u{1c5}A A\u{1c5} \u{2b0}\u{2b0}A a\u{2b0}B ABC'S ABC'sD",
    "HELLOworld helloWorld HTTPServer iPhone McDonald's",
    "  \t\n\r\n \u{b}\u{c}x",
    "!!!\n\n\nabc ;;\r\n\r\n ;;/\n/x",
];

#[test]
fn corpus_matches_fancy_regex() {
    let (cl, o200) = regexes();
    for text in CORPUS {
        check(&cl, &o200, text);
    }
    let long = [
        "a".repeat(10_000),
        " ".repeat(5_000),
        "1".repeat(1_000),
        "\n".repeat(500),
    ];
    for text in &long {
        check(&cl, &o200, text);
    }
}

#[test]
fn documented_cases() {
    assert_eq!(pieces::<Cl100k>("I'M they'Ve"), ["I", "'M", " they", "'Ve"]);
    assert_eq!(pieces::<O200k>("I'M they'Ve"), ["I'M", " they'Ve"]);
    // `\s++$` comes before the newline alternative in cl100k only.
    assert_eq!(pieces::<Cl100k>("a\n  "), ["a", "\n  "]);
    assert_eq!(pieces::<O200k>("a\n  "), ["a", "\n", "  "]);
    assert_eq!(pieces::<Cl100k>("12345"), ["123", "45"]);
    assert_eq!(
        pieces::<O200k>("helloWorld HELLOworld"),
        ["hello", "World", " HELLOworld"]
    );
    assert_eq!(pieces::<Cl100k>("   x"), ["  ", " x"]);
}

/// A character pool biased to the classes the patterns distinguish.
const POOL: &[&str] = &[
    "a",
    "z",
    "A",
    "Z",
    "s",
    "S",
    "t",
    "T",
    "l",
    "L",
    "e",
    "E",
    "v",
    "V",
    "r",
    "R",
    "d",
    "m",
    "M",
    "0",
    "7",
    "9",
    " ",
    " ",
    " ",
    "\t",
    "\n",
    "\r",
    "\u{b}",
    "\u{c}",
    "'",
    "'",
    "\"",
    ".",
    ",",
    "/",
    "/",
    "-",
    "!",
    "(",
    "}",
    "#",
    "_",
    "\u{17f}",
    "\u{e9}",
    "\u{c9}",
    "\u{301}",
    "\u{300}",
    "\u{915}",
    "\u{93f}",
    "\u{94d}",
    "\u{627}",
    "\u{64e}",
    "\u{4e2d}",
    "\u{3042}",
    "\u{2b0}",
    "\u{3005}",
    "\u{1c5}",
    "\u{3a9}",
    "\u{3c9}",
    "\u{416}",
    "\u{436}",
    "\u{661}",
    "\u{216b}",
    "\u{b2}",
    "\u{bd}",
    "\u{ff11}",
    "\u{a0}",
    "\u{2003}",
    "\u{3000}",
    "\u{85}",
    "\u{2028}",
    "\u{1f600}",
    "\u{200d}",
    "\u{fe0f}",
    "\u{1f3fb}",
    "\u{1f1fa}",
    "\u{10400}",
    "\u{1d400}",
    "\u{e0100}",
    "\u{0}",
];

struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

#[test]
fn random_texts_match_fancy_regex() {
    let (cl, o200) = regexes();
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    let mut text = String::new();
    for _ in 0..20_000 {
        text.clear();
        let len = rng.below(24);
        while text.chars().count() < len {
            let c = POOL[rng.below(POOL.len())];
            // Runs of one character exercise the run and backtracking logic.
            let repeat = if rng.below(5) == 0 {
                1 + rng.below(4)
            } else {
                1
            };
            for _ in 0..repeat {
                text.push_str(c);
            }
        }
        check(&cl, &o200, &text);
    }
}

#[test]
fn code_points_in_context_match_fancy_regex() {
    // Every 31st code point: the class table itself is checked exhaustively
    // in unicode.rs; this checks the scanners around each kind of character.
    let (cl, o200) = regexes();
    let mut text = String::new();
    for cp in (0..0x110000u32).step_by(31) {
        let Some(c) = char::from_u32(cp) else {
            continue;
        };
        text.clear();
        for ctx in ["a", " ", "'", "A"] {
            text.push_str(ctx);
            text.push(c);
            text.push(c);
        }
        text.push_str("'s");
        check(&cl, &o200, &text);
    }
}
