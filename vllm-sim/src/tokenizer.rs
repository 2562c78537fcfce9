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

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use xxhash_rust::xxh3::xxh3_64;

/// A token id.
pub type TokenId = u32;

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
const WORDS: [&str; 64] = [
    " the", " and", " for", " you", " not", " are", " but", " can", " all", " one", " her", " was",
    " had", " his", " our", " out", " day", " get", " has", " him", " how", " man", " new", " now",
    " old", " see", " two", " way", " who", " boy", " did", " its", " let", " put", " say", " she",
    " too", " use", " cat", " dog", " sun", " sky", " sea", " red", " big", " run", " fun", " low",
    " top", " yes", " end", " far", " few", " job", " key", " law", " map", " net", " oil", " pen",
    " row", " tea", " war", " win",
];

/// A deterministic stream of output tokens.
#[derive(Debug)]
pub struct TextGen {
    rng: StdRng,
}

impl TextGen {
    /// A generator seeded by the server seed and the request (its prompt, its own seed).
    pub fn new(seed: u64, salt: u64) -> Self {
        TextGen {
            rng: StdRng::seed_from_u64(seed ^ salt.rotate_left(17) ^ 0x5eed_5eed_5eed_5eed),
        }
    }

    /// The next token and its text.
    pub fn next_token(&mut self) -> (TokenId, &'static str) {
        let w = WORDS[self.rng.gen_range(0..WORDS.len())];
        (piece_id(w), w)
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
            text.push_str(w);
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
}
