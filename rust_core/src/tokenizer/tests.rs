//! End-to-end counts against values tiktoken 0.14's `encode_ordinary` gives
//! (the Python parity tests cover far more text).

use super::*;
use sha2::{Digest, Sha256};

#[test]
fn embedded_files_have_the_published_sha256() {
    for enc in ENCODINGS {
        let digest = Sha256::digest(enc.file());
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, enc.file_sha256(), "{}", enc.name());
    }
    assert_eq!(Encoding::Cl100kBase.file().len(), 1_681_126);
    assert_eq!(Encoding::O200kBase.file().len(), 3_613_922);
}

#[test]
fn vocab_sizes() {
    assert_eq!(Encoding::Cl100kBase.vocab().len(), 100_256);
    assert_eq!(Encoding::O200kBase.vocab().len(), 199_998);
}

#[test]
fn known_token_ids() {
    use Encoding::*;
    let cases: &[(Encoding, &str, &[Rank])] = &[
        (Cl100kBase, "hello world", &[15339, 1917]),
        (O200kBase, "hello world", &[24912, 2375]),
        (
            Cl100kBase,
            "I'M they'Ve 123456",
            &[40, 28703, 814, 6, 43712, 220, 4513, 10961],
        ),
        (
            O200kBase,
            "I'M they'Ve 123456",
            &[40, 95346, 1023, 6, 27493, 220, 7633, 19354],
        ),
        (
            Cl100kBase,
            "\u{4e2d}\u{6587} \u{1f600}",
            &[16325, 17161, 91416],
        ),
        (O200kBase, "\u{4e2d}\u{6587} \u{1f600}", &[10667, 88038]),
        (
            Cl100kBase,
            "\n\n  fn main() {}\n",
            &[271, 220, 5279, 1925, 368, 5731],
        ),
        (
            O200kBase,
            "\n\n  fn main() {}\n",
            &[279, 220, 9784, 2758, 416, 11421],
        ),
        (O200kBase, "", &[]),
    ];
    for &(enc, text, ids) in cases {
        assert_eq!(enc.encode_ordinary(text), ids, "{} {text:?}", enc.name());
        assert_eq!(enc.count(text), ids.len(), "{} {text:?}", enc.name());
    }
}

#[test]
fn long_runs_use_the_heap_merge() {
    use Encoding::*;
    let cases = [
        (Cl100kBase, "a".repeat(10_000), 1250, 70540),
        (O200kBase, "a".repeat(10_000), 1250, 117525),
        (Cl100kBase, " ".repeat(5_000), 40, 58040),
        (O200kBase, " ".repeat(5_000), 40, 72056),
        (Cl100kBase, "ab".repeat(3_000), 3000, 370),
        (O200kBase, "ab".repeat(3_000), 1500, 68822),
    ];
    for (enc, text, count, first) in cases {
        assert_eq!(enc.count(&text), count, "{}", enc.name());
        let ids = enc.encode_ordinary(&text);
        assert_eq!((ids.len(), ids[0]), (count, first), "{}", enc.name());
    }
}

#[test]
fn tokens_decode_back_to_the_text() {
    let text = "Grüße, мир! \u{1f469}\u{200d}\u{1f4bb} x\u{301}y — done.\r\n";
    for enc in ENCODINGS {
        let bytes: Vec<u8> = enc
            .encode_ordinary(text)
            .iter()
            .flat_map(|&r| enc.vocab().token_bytes(r).unwrap().iter().copied())
            .collect();
        assert_eq!(bytes, text.as_bytes());
    }
}

#[test]
fn model_encodings() {
    use Encoding::*;
    let cases = [
        ("gpt-4o", O200kBase),
        ("gpt-4o-mini-2024-07-18", O200kBase),
        ("gpt-4.1-nano", O200kBase),
        ("gpt-5-mini", O200kBase),
        ("o1", O200kBase),
        ("o3-mini", O200kBase),
        ("o4-mini", O200kBase),
        ("chatgpt-4o-latest", O200kBase),
        ("gpt-4", Cl100kBase),
        ("gpt-4-turbo", Cl100kBase),
        ("gpt-3.5-turbo-0125", Cl100kBase),
        ("text-embedding-3-small", Cl100kBase),
        ("text-embedding-ada-002", Cl100kBase),
        ("openai/gpt-4o-mini", O200kBase),
        ("openai/gpt-3.5-turbo", Cl100kBase),
        ("ft:gpt-3.5-turbo:acme::abc123", Cl100kBase),
        ("ft:gpt-4o-mini:acme::abc123", O200kBase),
        ("anthropic/claude-3.5-sonnet", O200kBase),
        ("llama-3.1-8b", O200kBase),
    ];
    for (model, enc) in cases {
        assert_eq!(encoding_for_model(model), enc, "{model}");
    }
}
