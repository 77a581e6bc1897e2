//! The CLIP byte-level BPE tokenizer used by SD 1.x/2.x text encoders.
//!
//! The vocabulary and merges ship inside the binary (`assets/clip/tokenizer.json`, the
//! `tokenizers` JSON format), as ComfyUI ships its own copy, so prompts encode with no
//! download. The steps follow that file's pipeline: whitespace runs become one space and
//! text is lowercased; CLIP's split pattern cuts it into words (special tokens, English
//! contractions, letter runs, single digits, punctuation runs); each word's UTF-8 bytes are
//! mapped to the GPT-2 printable alphabet, the last symbol gets the `</w>` suffix, and merges
//! are applied lowest rank first.

use std::collections::HashMap;
use std::sync::OnceLock;

use crate::error::{ModelError, Result};

static TOKENIZER_JSON: &[u8] = include_bytes!("../../../assets/clip/tokenizer.json");

/// Id of `<|startoftext|>`.
pub const BOS_TOKEN: u32 = 49406;
/// Id of `<|endoftext|>`.
pub const EOS_TOKEN: u32 = 49407;
/// Id of `!`, SD 2.x's padding token.
pub const EXCLAMATION_TOKEN: u32 = 0;
/// How a prompt names a textual-inversion embedding (`embedding:EasyNegative`).
pub const EMBEDDING_PREFIX: &str = "embedding:";
/// Tokens per CLIP window, BOS and EOS included.
pub const CONTEXT_LENGTH: usize = 77;

/// The CLIP tokenizer: vocabulary, merge ranks and the byte alphabet.
#[derive(Debug)]
pub struct ClipTokenizer {
    vocab: HashMap<String, u32>,
    merge_ranks: HashMap<(String, String), usize>,
    byte_chars: [char; 256],
}

impl ClipTokenizer {
    /// The tokenizer built into sakuga, parsed once per process.
    ///
    /// # Panics
    /// Never in practice: the embedded file is checked by the unit tests.
    pub fn shared() -> &'static ClipTokenizer {
        static SHARED: OnceLock<ClipTokenizer> = OnceLock::new();
        SHARED.get_or_init(|| {
            Self::from_json(TOKENIZER_JSON).expect("embedded CLIP tokenizer.json is valid")
        })
    }

    /// Parses a `tokenizers`-format BPE tokenizer file.
    ///
    /// # Errors
    /// [`ModelError::InvalidInput`] when the JSON lacks a BPE vocab or merges.
    pub fn from_json(bytes: &[u8]) -> Result<Self> {
        let bad = |what: &str| ModelError::InvalidInput(format!("tokenizer json: {what}"));
        let json: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|e| bad(&e.to_string()))?;
        let model = json.get("model").ok_or_else(|| bad("no model"))?;
        let vocab_json = model
            .get("vocab")
            .and_then(|v| v.as_object())
            .ok_or_else(|| bad("no vocab"))?;
        let mut vocab = HashMap::with_capacity(vocab_json.len() + 2);
        for (token, id) in vocab_json {
            let id = id.as_u64().ok_or_else(|| bad("vocab id is not a number"))?;
            vocab.insert(token.clone(), id as u32);
        }
        if let Some(added) = json.get("added_tokens").and_then(|a| a.as_array()) {
            for token in added {
                if let (Some(content), Some(id)) = (
                    token.get("content").and_then(|c| c.as_str()),
                    token.get("id").and_then(|i| i.as_u64()),
                ) {
                    vocab.insert(content.to_string(), id as u32);
                }
            }
        }
        let merges = model
            .get("merges")
            .and_then(|m| m.as_array())
            .ok_or_else(|| bad("no merges"))?;
        let mut merge_ranks = HashMap::with_capacity(merges.len());
        for (rank, merge) in merges.iter().enumerate() {
            let pair = match merge {
                serde_json::Value::String(s) => s
                    .split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string())),
                serde_json::Value::Array(parts) if parts.len() == 2 => {
                    match (parts[0].as_str(), parts[1].as_str()) {
                        (Some(a), Some(b)) => Some((a.to_string(), b.to_string())),
                        _ => None,
                    }
                }
                _ => None,
            }
            .ok_or_else(|| bad("malformed merge"))?;
            merge_ranks.insert(pair, rank);
        }
        Ok(Self {
            vocab,
            merge_ranks,
            byte_chars: byte_alphabet(),
        })
    }

    /// Number of tokens in the vocabulary.
    pub fn vocab_size(&self) -> usize {
        self.vocab.len()
    }

    /// Token ids of `text` with BOS and EOS around them, no padding or truncation.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut ids = vec![BOS_TOKEN];
        ids.extend(self.encode_words(text));
        ids.push(EOS_TOKEN);
        ids
    }

    /// Token ids of `text` without BOS/EOS.
    pub fn encode_words(&self, text: &str) -> Vec<u32> {
        let normalised = normalise(text);
        let mut ids = Vec::new();
        for word in split_words(&normalised) {
            if let Some(&id) = self.vocab.get(word)
                && (word == "<|startoftext|>" || word == "<|endoftext|>")
            {
                ids.push(id);
                continue;
            }
            self.bpe_word(word, &mut ids);
        }
        ids
    }

    /// Windows of exactly [`CONTEXT_LENGTH`] ids for a prompt, as ComfyUI feeds SD: the
    /// prompt's tokens are cut into chunks of 75, each wrapped in BOS/EOS and padded with
    /// `pad`. An empty prompt gives one window.
    pub fn encode_windows(&self, text: &str, pad: u32) -> Vec<Vec<u32>> {
        windows(&self.encode_words(text), BOS_TOKEN, EOS_TOKEN, pad)
    }

    /// Like [`ClipTokenizer::encode_windows`] but honouring ComfyUI's `(text:weight)`
    /// emphasis: every id carries the weight of the span it came from (BOS, EOS and padding
    /// weigh 1).
    pub fn encode_weighted_windows(&self, text: &str, pad: u32) -> Vec<Vec<(u32, f32)>> {
        self.encode_weighted_windows_with(text, pad, &mut |_| None)
    }

    /// [`ClipTokenizer::encode_weighted_windows`] with ComfyUI's `embedding:name` words:
    /// `embed` gets the name (trailing commas stripped) and returns the ids standing for
    /// its vectors, or `None` to keep the word as text.
    pub fn encode_weighted_windows_with(
        &self,
        text: &str,
        pad: u32,
        embed: &mut dyn FnMut(&str) -> Option<Vec<u32>>,
    ) -> Vec<Vec<(u32, f32)>> {
        let mut words = Vec::new();
        for (segment, weight) in super::prompt::parse_weighted(text) {
            let mut plain = String::new();
            for word in segment.split(' ') {
                let ids = word
                    .strip_prefix(EMBEDDING_PREFIX)
                    .map(|name| name.trim_end_matches(['\n', ',']))
                    .and_then(&mut *embed);
                match ids {
                    Some(ids) => {
                        words.extend(self.encode_words(&plain).into_iter().map(|id| (id, weight)));
                        plain.clear();
                        words.extend(ids.into_iter().map(|id| (id, weight)));
                    }
                    None => {
                        plain.push_str(word);
                        plain.push(' ');
                    }
                }
            }
            words.extend(self.encode_words(&plain).into_iter().map(|id| (id, weight)));
        }
        windows(&words, (BOS_TOKEN, 1.0), (EOS_TOKEN, 1.0), (pad, 1.0))
    }

    fn bpe_word(&self, word: &str, ids: &mut Vec<u32>) {
        let mut symbols: Vec<String> = word
            .bytes()
            .map(|b| self.byte_chars[b as usize].to_string())
            .collect();
        if let Some(last) = symbols.last_mut() {
            last.push_str("</w>");
        }
        loop {
            let best = symbols
                .windows(2)
                .enumerate()
                .filter_map(|(i, pair)| {
                    self.merge_ranks
                        .get(&(pair[0].clone(), pair[1].clone()))
                        .map(|&rank| (rank, i))
                })
                .min();
            let Some((_, index)) = best else { break };
            let merged = format!("{}{}", symbols[index], symbols[index + 1]);
            symbols[index] = merged;
            symbols.remove(index + 1);
        }
        for symbol in symbols {
            match self.vocab.get(&symbol) {
                Some(&id) => ids.push(id),
                // Every single byte symbol is in the vocabulary, so this only happens for a
                // broken tokenizer file; fall back to per-character lookups.
                None => ids.extend(
                    symbol
                        .trim_end_matches("</w>")
                        .chars()
                        .filter_map(|c| self.vocab.get(&c.to_string()).copied()),
                ),
            }
        }
    }
}

/// GPT-2's reversible byte to printable-character table.
fn byte_alphabet() -> [char; 256] {
    let mut table = ['\0'; 256];
    let printable = |b: u32| {
        (u32::from('!')..=u32::from('~')).contains(&b)
            || (0xA1..=0xAC).contains(&b)
            || (0xAE..=0xFF).contains(&b)
    };
    let mut next_free = 256u32;
    for (byte, slot) in table.iter_mut().enumerate() {
        let byte = byte as u32;
        let code = if printable(byte) {
            byte
        } else {
            let code = next_free;
            next_free += 1;
            code
        };
        *slot = char::from_u32(code).unwrap_or('?');
    }
    table
}

/// Whitespace runs to one space, trimmed, lowercased (the file's normaliser; NFC is the
/// identity for the precomposed text prompts are typed in).
fn normalise(text: &str) -> String {
    text.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .to_lowercase()
}

fn is_letter(c: char) -> bool {
    c.is_alphabetic() && !c.is_numeric()
}

/// CLIP's split pattern: `<|startoftext|>|<|endoftext|>|'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|
/// [^\s\p{L}\p{N}]+`, whitespace dropped.
fn split_words(text: &str) -> Vec<&str> {
    const SPECIALS: [&str; 2] = ["<|startoftext|>", "<|endoftext|>"];
    const CONTRACTIONS: [&str; 7] = ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d"];
    let mut words = Vec::new();
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        let len = if let Some(special) = SPECIALS.iter().find(|s| rest.starts_with(**s)) {
            special.len()
        } else if let Some(contraction) = CONTRACTIONS.iter().find(|s| rest.starts_with(**s)) {
            contraction.len()
        } else if c.is_whitespace() {
            rest = &rest[c.len_utf8()..];
            continue;
        } else if is_letter(c) {
            rest.find(|x: char| !is_letter(x)).unwrap_or(rest.len())
        } else if c.is_numeric() {
            c.len_utf8()
        } else {
            rest.find(|x: char| x.is_whitespace() || is_letter(x) || x.is_numeric())
                .unwrap_or(rest.len())
        };
        words.push(&rest[..len]);
        rest = &rest[len..];
    }
    words
}

/// Windows of exactly [`CONTEXT_LENGTH`] items: the items cut into chunks of 75, each
/// wrapped in `bos`/`eos` and padded with `pad`; no items give one window.
fn windows<T: Copy>(items: &[T], bos: T, eos: T, pad: T) -> Vec<Vec<T>> {
    let chunk = CONTEXT_LENGTH - 2;
    let mut windows = Vec::new();
    let mut start = 0;
    loop {
        let end = (start + chunk).min(items.len());
        let mut window = Vec::with_capacity(CONTEXT_LENGTH);
        window.push(bos);
        window.extend_from_slice(&items[start..end]);
        window.push(eos);
        window.resize(CONTEXT_LENGTH, pad);
        windows.push(window);
        start = end;
        if start >= items.len() {
            break;
        }
    }
    windows
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_the_reference_sentence() {
        let tokenizer = ClipTokenizer::shared();
        assert_eq!(
            tokenizer.encode("a photo of a cat"),
            vec![49406, 320, 1125, 539, 320, 2368, 49407]
        );
        assert_eq!(tokenizer.vocab_size(), 49408);
    }

    #[test]
    fn normalises_case_and_whitespace() {
        let tokenizer = ClipTokenizer::shared();
        assert_eq!(
            tokenizer.encode("A   Photo\tof a CAT"),
            tokenizer.encode("a photo of a cat")
        );
    }

    #[test]
    fn splits_like_the_clip_pattern() {
        assert_eq!(
            split_words("it's 42 cats!! <|endoftext|>"),
            vec!["it", "'s", "4", "2", "cats", "!!", "<|endoftext|>"]
        );
    }

    #[test]
    fn windows_are_padded_and_chunked() {
        let tokenizer = ClipTokenizer::shared();
        let windows = tokenizer.encode_windows("a photo of a cat", EOS_TOKEN);
        assert_eq!(windows.len(), 1);
        assert_eq!(windows[0].len(), CONTEXT_LENGTH);
        assert_eq!(&windows[0][..7], &[49406, 320, 1125, 539, 320, 2368, 49407]);
        assert!(windows[0][7..].iter().all(|&t| t == EOS_TOKEN));
        let long = "cat ".repeat(100);
        let windows = tokenizer.encode_windows(&long, EXCLAMATION_TOKEN);
        assert_eq!(windows.len(), 2);
        assert!(windows.iter().all(|w| w.len() == CONTEXT_LENGTH));
        assert_eq!(windows[1][..26].iter().filter(|&&t| t == 2368).count(), 25);
    }
}
