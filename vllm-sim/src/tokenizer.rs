//! Deterministic stand-in tokenizer, chat template and text generator.
//!
//! * Text is cut into pieces of 4 characters (Unicode scalar values); each piece's id is a
//!   hash of it, so about 4 characters make a token and equal text gives equal ids.
//! * Chat messages go through a fixed ChatML template
//!   (`<|im_start|>{role}\n{content}<|im_end|>\n`, then `<|im_start|>assistant\n`), with the
//!   markers as special tokens, so each message starts on a token boundary and a growing
//!   conversation is a growing token prefix.
//! * Generated tokens are 4-character words (`" the"`, `" sky"`, …) and the chat EOS is
//!   `<|im_end|>`: when a client sends a reply back as the next turn's assistant message, it
//!   tokenizes to exactly the ids that were generated, as with a real model.
//!
//! [`TextGen`] draws from a [`Words`] list: this stand-in's by default, or the same words as a
//! real model's token ids when `--tokenizer` is given ([`crate::model_tokenizer`]).

use std::collections::VecDeque;
use std::sync::{Arc, LazyLock};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use xxhash_rust::xxh3::xxh3_64;

/// A token id.
pub type TokenId = u32;

/// The text of a generated token, cheap to clone (the words are shared by every request).
pub type TokenText = Arc<str>;

/// The text of a token that adds none (EOS).
pub fn empty_text() -> TokenText {
    static EMPTY: LazyLock<TokenText> = LazyLock::new(|| Arc::from(""));
    EMPTY.clone()
}

/// `<|endoftext|>`: EOS of `/v1/completions`.
pub const END_OF_TEXT: TokenId = 0;
/// `<|im_start|>`: opens a chat message.
pub const IM_START: TokenId = 1;
/// `<|im_end|>`: closes a chat message; EOS of chat completions.
pub const IM_END: TokenId = 2;
/// Ids below this are reserved for special tokens.
const FIRST_TEXT_ID: TokenId = 16;
/// Characters per text token.
pub const CHARS_PER_TOKEN: usize = 4;

/// The id of one text piece.
pub fn piece_id(piece: &str) -> TokenId {
    let h = (xxh3_64(piece.as_bytes()) & 0x7fff_ffff) as TokenId;
    h.max(FIRST_TEXT_ID)
}

/// Appends the tokens of plain text (no special tokens) to `out`.
pub fn encode_into(text: &str, out: &mut Vec<TokenId>) {
    let mut start = 0;
    let mut chars = 0;
    for (i, _) in text.char_indices() {
        if chars == CHARS_PER_TOKEN {
            out.push(piece_id(&text[start..i]));
            start = i;
            chars = 0;
        }
        chars += 1;
    }
    if chars > 0 {
        out.push(piece_id(&text[start..]));
    }
}

/// Tokens of a `/v1/completions` text prompt.
pub fn encode(text: &str) -> Vec<TokenId> {
    let mut out = Vec::with_capacity(text.len() / CHARS_PER_TOKEN + 1);
    encode_into(text, &mut out);
    out
}

/// Renders chat messages `(role, content)` through the template, with the generation prompt.
pub fn render_chat<'a>(messages: impl IntoIterator<Item = (&'a str, &'a str)>) -> Vec<TokenId> {
    let mut out = Vec::new();
    for (role, content) in messages {
        out.push(IM_START);
        encode_into(role, &mut out);
        encode_into("\n", &mut out);
        encode_into(content, &mut out);
        out.push(IM_END);
        encode_into("\n", &mut out);
    }
    out.push(IM_START);
    encode_into("assistant", &mut out);
    encode_into("\n", &mut out);
    out
}

/// Words the generator emits; each is exactly [`CHARS_PER_TOKEN`] characters.
pub const WORDS: [&str; 64] = [
    " the", " and", " for", " you", " not", " are", " but", " can", " all", " one", " her", " was",
    " had", " his", " our", " out", " day", " get", " has", " him", " how", " man", " new", " now",
    " old", " see", " two", " way", " who", " boy", " did", " its", " let", " put", " say", " she",
    " too", " use", " cat", " dog", " sun", " sky", " sea", " red", " big", " run", " fun", " low",
    " top", " yes", " end", " far", " few", " job", " key", " law", " map", " net", " oil", " pen",
    " row", " tea", " war", " win",
];

/// One word of the generator: the tokens it is made of, each with the text it adds.
#[derive(Debug, Clone)]
pub struct Word {
    first: (TokenId, TokenText),
    rest: Vec<(TokenId, TokenText)>,
}

impl Word {
    /// A word of the given tokens; `None` when there are none.
    pub fn new(tokens: Vec<(TokenId, TokenText)>) -> Option<Word> {
        let mut it = tokens.into_iter();
        let first = it.next()?;
        Some(Word {
            first,
            rest: it.collect(),
        })
    }

    /// The word's tokens, in order.
    pub fn tokens(&self) -> impl Iterator<Item = &(TokenId, TokenText)> {
        std::iter::once(&self.first).chain(&self.rest)
    }
}

/// The words a [`TextGen`] draws from, uniformly.
#[derive(Debug, Clone)]
pub struct Words {
    first: Word,
    rest: Vec<Word>,
}

impl Words {
    /// A list of words; `None` when there are none.
    pub fn new(words: Vec<Word>) -> Option<Words> {
        let mut it = words.into_iter();
        let first = it.next()?;
        Some(Words {
            first,
            rest: it.collect(),
        })
    }

    /// The stand-in's words: [`WORDS`], one token each, ids [`piece_id`].
    pub fn stand_in() -> Arc<Words> {
        static STAND_IN: LazyLock<Arc<Words>> = LazyLock::new(|| {
            let words = WORDS.map(|w| Word {
                first: (piece_id(w), Arc::from(w)),
                rest: Vec::new(),
            });
            let [first, rest @ ..] = words;
            Arc::new(Words {
                first,
                rest: rest.to_vec(),
            })
        });
        STAND_IN.clone()
    }

    /// How many words there are.
    pub fn len(&self) -> usize {
        1 + self.rest.len()
    }

    /// Always false: a list has at least one word.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The words, in order.
    pub fn iter(&self) -> impl Iterator<Item = &Word> {
        std::iter::once(&self.first).chain(&self.rest)
    }

    fn get(&self, i: usize) -> &Word {
        i.checked_sub(1)
            .and_then(|i| self.rest.get(i))
            .unwrap_or(&self.first)
    }
}

/// A deterministic stream of output tokens: words drawn uniformly, each emitted token by token.
#[derive(Debug)]
pub struct TextGen {
    rng: StdRng,
    words: Arc<Words>,
    /// The tokens left of the current word.
    pending: VecDeque<(TokenId, TokenText)>,
}

impl TextGen {
    /// A generator of the stand-in's words, seeded by the server seed and the request (its
    /// prompt, its own seed).
    pub fn new(seed: u64, salt: u64) -> Self {
        Self::with_words(seed, salt, Words::stand_in())
    }

    /// A generator of `words`, seeded as [`TextGen::new`]; the draws are the same for any
    /// list of the same length.
    pub fn with_words(seed: u64, salt: u64, words: Arc<Words>) -> Self {
        TextGen {
            rng: StdRng::seed_from_u64(seed ^ salt.rotate_left(17) ^ 0x5eed_5eed_5eed_5eed),
            words,
            pending: VecDeque::new(),
        }
    }

    /// The next token and its text.
    pub fn next_token(&mut self) -> (TokenId, TokenText) {
        if let Some(t) = self.pending.pop_front() {
            return t;
        }
        let word = self.words.get(self.rng.gen_range(0..self.words.len()));
        self.pending.extend(word.rest.iter().cloned());
        word.first.clone()
    }

    /// A uniform draw in `lo..=hi`, for output lengths.
    pub fn draw(&mut self, lo: usize, hi: usize) -> usize {
        if hi <= lo {
            lo
        } else {
            self.rng.gen_range(lo..=hi)
        }
    }

    /// A uniform draw in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        self.rng.gen::<f64>()
    }
}

/// The text of ids the stand-in can name: its special tokens and the generator's words (text
/// pieces of prompts are hashed, so they cannot be decoded); `Err` is the first other id.
pub fn decode_known(ids: &[TokenId]) -> Result<String, TokenId> {
    static NAMES: LazyLock<std::collections::HashMap<TokenId, &'static str>> =
        LazyLock::new(|| {
            let mut names: std::collections::HashMap<TokenId, &'static str> =
                WORDS.iter().map(|&w| (piece_id(w), w)).collect();
            names.insert(END_OF_TEXT, "<|endoftext|>");
            names.insert(IM_START, "<|im_start|>");
            names.insert(IM_END, "<|im_end|>");
            names
        });
    let mut out = String::new();
    for id in ids {
        out.push_str(NAMES.get(id).ok_or(*id)?);
    }
    Ok(out)
}

/// A 64-bit digest of a token sequence (seeds per-request generators).
pub fn digest(tokens: &[TokenId]) -> u64 {
    let mut bytes = Vec::with_capacity(tokens.len() * 4);
    for t in tokens {
        bytes.extend_from_slice(&t.to_le_bytes());
    }
    xxh3_64(&bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn about_four_characters_per_token() {
        assert_eq!(encode("").len(), 0);
        assert_eq!(encode("abcd").len(), 1);
        assert_eq!(encode("abcde").len(), 2);
        assert_eq!(encode(&"x".repeat(400)).len(), 100);
        // multi-byte characters count as one character each
        assert_eq!(encode("ééééé").len(), 2);
        assert_eq!(encode("abcdabcd")[0], encode("abcdabcd")[1]);
    }

    #[test]
    fn growing_conversation_is_growing_prefix() {
        let t1 = render_chat([
            ("system", "Be brief."),
            ("user", "Hello there, how are you?"),
        ]);
        let t2 = render_chat([
            ("system", "Be brief."),
            ("user", "Hello there, how are you?"),
            ("assistant", " the sky"),
            ("user", "And then?"),
        ]);
        assert!(t2.len() > t1.len());
        assert_eq!(&t2[..t1.len()], &t1[..]);
    }

    #[test]
    fn generated_reply_retokenizes_to_generated_ids() {
        let prompt = render_chat([("user", "Tell me a story.")]);
        let mut gen = TextGen::new(7, digest(&prompt));
        let mut ids = Vec::new();
        let mut text = String::new();
        for _ in 0..20 {
            let (id, w) = gen.next_token();
            ids.push(id);
            text.push_str(&w);
        }
        let next = render_chat([
            ("user", "Tell me a story."),
            ("assistant", &text),
            ("user", "More."),
        ]);
        let mut expect = prompt.clone();
        expect.extend(&ids);
        expect.push(IM_END);
        assert_eq!(&next[..expect.len()], &expect[..]);
    }

    #[test]
    fn generator_is_deterministic() {
        let a: Vec<_> = (0..10)
            .scan(TextGen::new(1, 2), |g, _| Some(g.next_token()))
            .collect();
        let b: Vec<_> = (0..10)
            .scan(TextGen::new(1, 2), |g, _| Some(g.next_token()))
            .collect();
        let c: Vec<_> = (0..10)
            .scan(TextGen::new(3, 2), |g, _| Some(g.next_token()))
            .collect();
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert!(WORDS.iter().all(|w| w.chars().count() == CHARS_PER_TOKEN));
    }

    #[test]
    fn multi_token_words_come_out_token_by_token() {
        let word = |ids: &[TokenId]| {
            Word::new(
                ids.iter()
                    .map(|&i| (i, TokenText::from(format!("<{i}>"))))
                    .collect(),
            )
            .unwrap()
        };
        let words = Arc::new(Words::new(vec![word(&[1, 2, 3]), word(&[4])]).unwrap());
        let mut gen = TextGen::with_words(5, 6, words);
        let ids: Vec<TokenId> = (0..40).map(|_| gen.next_token().0).collect();
        // 2 and 3 only ever follow 1 and 2.
        for (i, &id) in ids.iter().enumerate().skip(1) {
            match id {
                2 => assert_eq!(ids[i - 1], 1),
                3 => assert_eq!(ids[i - 1], 2),
                _ => {}
            }
        }
        assert!(ids.contains(&3) && ids.contains(&4), "{ids:?}");
        assert!(Word::new(Vec::new()).is_none());
        assert!(Words::new(Vec::new()).is_none());
    }
}
