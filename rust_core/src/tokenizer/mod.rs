//! Token counts identical to tiktoken's `encode_ordinary` for `cl100k_base`
//! and `o200k_base`, without regexes.
//!
//! The token files are tiktoken's own, embedded in the binary and parsed
//! once on first use; the pre-tokenizers are hand-written scanners
//! (`pretokenize`) that reproduce tiktoken's regexes, and the byte-pair
//! merge follows tiktoken's order exactly (`bpe`).

mod bpe;
pub mod chat;
pub mod pretokenize;
mod unicode;

use std::sync::OnceLock;

pub use bpe::{Rank, Vocab};
use pretokenize::{Cl100k, O200k, PreTokenizer};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Encoding {
    Cl100kBase,
    O200kBase,
}

pub const ENCODINGS: [Encoding; 2] = [Encoding::Cl100kBase, Encoding::O200kBase];

static CL100K_FILE: &[u8] = include_bytes!("../../data/cl100k_base.tiktoken");
static O200K_FILE: &[u8] = include_bytes!("../../data/o200k_base.tiktoken");

impl Encoding {
    pub fn from_name(name: &str) -> Option<Encoding> {
        match name {
            "o200k_base" => Some(Encoding::O200kBase),
            "cl100k_base" => Some(Encoding::Cl100kBase),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Encoding::Cl100kBase => "cl100k_base",
            Encoding::O200kBase => "o200k_base",
        }
    }

    /// The embedded `.tiktoken` file, byte for byte.
    pub fn file(self) -> &'static [u8] {
        match self {
            Encoding::Cl100kBase => CL100K_FILE,
            Encoding::O200kBase => O200K_FILE,
        }
    }

    /// The file's sha256, as tiktoken_ext and DESIGN.md give it.
    pub fn file_sha256(self) -> &'static str {
        match self {
            Encoding::Cl100kBase => {
                "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"
            }
            Encoding::O200kBase => {
                "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
            }
        }
    }

    fn cell(self) -> &'static OnceLock<Vocab> {
        static CL100K: OnceLock<Vocab> = OnceLock::new();
        static O200K: OnceLock<Vocab> = OnceLock::new();
        match self {
            Encoding::Cl100kBase => &CL100K,
            Encoding::O200kBase => &O200K,
        }
    }

    /// The parsed vocabulary; the first call parses the file (tens of ms).
    pub fn vocab(self) -> &'static Vocab {
        self.cell()
            .get_or_init(|| Vocab::parse(self.file()).expect("the embedded token file is valid"))
    }

    /// Whether the vocabulary is parsed already (so a call will not block).
    pub fn is_loaded(self) -> bool {
        self.cell().get().is_some()
    }

    /// Number of tokens `encode_ordinary` gives for `text`.
    pub fn count(self, text: &str) -> usize {
        match self {
            Encoding::Cl100kBase => count_with::<Cl100k>(self.vocab(), text),
            Encoding::O200kBase => count_with::<O200k>(self.vocab(), text),
        }
    }

    /// tiktoken's `encode_ordinary`: the token ids, special tokens ignored.
    pub fn encode_ordinary(self, text: &str) -> Vec<Rank> {
        match self {
            Encoding::Cl100kBase => encode_with::<Cl100k>(self.vocab(), text),
            Encoding::O200kBase => encode_with::<O200k>(self.vocab(), text),
        }
    }

    /// The pre-tokenizer's pieces of `text`.
    pub fn pieces(self, text: &str) -> Vec<&str> {
        match self {
            Encoding::Cl100kBase => pretokenize::pieces::<Cl100k>(text),
            Encoding::O200kBase => pretokenize::pieces::<O200k>(text),
        }
    }
}

fn count_with<P: PreTokenizer>(vocab: &Vocab, text: &str) -> usize {
    let bytes = text.as_bytes();
    let mut scratch = Vec::new();
    let mut total = 0;
    let mut i = 0;
    while i < bytes.len() {
        let end = P::piece_end(bytes, i);
        total += vocab.count_piece(&bytes[i..end], &mut scratch);
        i = end;
    }
    total
}

fn encode_with<P: PreTokenizer>(vocab: &Vocab, text: &str) -> Vec<Rank> {
    let bytes = text.as_bytes();
    let mut scratch = Vec::new();
    let mut out = Vec::with_capacity(bytes.len() / 4);
    let mut i = 0;
    while i < bytes.len() {
        let end = P::piece_end(bytes, i);
        vocab.encode_piece(&bytes[i..end], &mut out, &mut scratch);
        i = end;
    }
    out
}

/// The encoding a model's tokenizer uses, as tiktoken's `encoding_for_model`
/// maps OpenAI models. OpenRouter ids (`openai/gpt-4o-mini`) map by the part
/// after the vendor, fine-tunes (`ft:gpt-4o-mini:org::id`) by their base
/// model. Models of other vendors and unknown models map to o200k_base: their
/// own tokenizers are not public or not BPE over these files, and o200k is
/// the closer approximation for current models.
pub fn encoding_for_model(model: &str) -> Encoding {
    let model = model.strip_prefix("ft:").unwrap_or(model);
    let model = model.rsplit('/').next().unwrap_or(model);
    let model = model.split(':').next().unwrap_or(model);
    const CL100K_PREFIXES: [&str; 6] = [
        "gpt-4",
        "gpt-3.5",
        "gpt-35",
        "text-embedding-3-",
        "text-embedding-ada-002",
        "text-similarity-",
    ];
    const O200K_PREFIXES: [&str; 6] = [
        "gpt-4o",
        "gpt-4.1",
        "gpt-4.5",
        "chatgpt-4o",
        "gpt-5",
        "gpt-oss",
    ];
    if O200K_PREFIXES.iter().any(|p| model.starts_with(p)) {
        return Encoding::O200kBase;
    }
    if CL100K_PREFIXES.iter().any(|p| model.starts_with(p)) {
        return Encoding::Cl100kBase;
    }
    Encoding::O200kBase
}

#[cfg(test)]
mod tests;
