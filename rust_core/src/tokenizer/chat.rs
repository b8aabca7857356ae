//! Prompt tokens of a chat request, after OpenAI's cookbook
//! (`num_tokens_from_messages` and `num_tokens_for_tools`).
//!
//! The caller walks the request (a decoded JSON object) and feeds a
//! [`ChatPrompt`] what the model will read; counting then needs no access to
//! the original objects, so a binding can release the GIL for it. Rules:
//!
//! - every message costs 3 tokens, plus the tokens of each of its string
//!   fields (`role`, `content`, `name`, `tool_call_id`, ...), plus 1 more
//!   when it has a `name`; the reply is primed with 3 more;
//! - `content` given as parts counts its text (and refusal) parts; an image
//!   part is a fixed estimate, since its size is not in the request: 85
//!   tokens at `detail: "low"`, otherwise 765 (a 1024x1024 image at high
//!   detail: 85 + 4 tiles x 170); other parts (audio, files) count 0;
//! - an assistant's `tool_calls` (and the deprecated `function_call`) count
//!   the function's name and arguments plus 3 per call (an approximation:
//!   OpenAI does not publish the format);
//! - `tools` (and the deprecated `functions`) count as the cookbook's
//!   `num_tokens_for_tools`: per function 7
//!   (o200k) or 10 (cl100k) + tokens of `name:description`; per function with
//!   properties 3; per property 3 + tokens of `name:type:description`; per
//!   enum -3 + per item 3 + its tokens; 12 once after the functions. Nested
//!   object properties count like top-level ones (the cookbook ignores them).

use std::borrow::Cow;

use super::Encoding;

pub const TOKENS_PER_MESSAGE: i64 = 3;
pub const TOKENS_PER_NAME: i64 = 1;
pub const REPLY_PRIMING_TOKENS: i64 = 3;
pub const IMAGE_LOW_DETAIL_TOKENS: i64 = 85;
pub const IMAGE_TOKENS: i64 = 765;
pub const TOKENS_PER_TOOL_CALL: i64 = 3;

const FUNCTION_INIT_O200K: i64 = 7;
const FUNCTION_INIT_CL100K: i64 = 10;
const PROPERTIES_INIT: i64 = 3;
const PROPERTY_KEY: i64 = 3;
const ENUM_INIT: i64 = -3;
const ENUM_ITEM: i64 = 3;
const FUNCTIONS_END: i64 = 12;

/// What the model reads of one chat request.
#[derive(Default, Debug)]
pub struct ChatPrompt<'a> {
    texts: Vec<Cow<'a, str>>,
    text_bytes: usize,
    /// Fixed overheads; signed because an enum's overhead is negative.
    fixed: i64,
    functions: i64,
}

impl<'a> ChatPrompt<'a> {
    pub fn new() -> Self {
        Self::default()
    }

    fn text(&mut self, text: impl Into<Cow<'a, str>>) {
        let text = text.into();
        self.text_bytes += text.len();
        self.texts.push(text);
    }

    /// Bytes of text to tokenize: what decides whether to count off the GIL.
    pub fn text_bytes(&self) -> usize {
        self.text_bytes
    }

    pub fn message(&mut self) {
        self.fixed += TOKENS_PER_MESSAGE;
    }

    /// A string field of the current message (`role`, `content`, `name`...).
    pub fn string_field(&mut self, key: &str, value: impl Into<Cow<'a, str>>) {
        if key == "name" {
            self.fixed += TOKENS_PER_NAME;
        }
        self.text(value);
    }

    /// A text (or refusal) part of a message's content.
    pub fn text_part(&mut self, text: impl Into<Cow<'a, str>>) {
        self.text(text);
    }

    pub fn image_part(&mut self, detail: Option<&str>) {
        self.fixed += if detail == Some("low") {
            IMAGE_LOW_DETAIL_TOKENS
        } else {
            IMAGE_TOKENS
        };
    }

    pub fn tool_call(&mut self, name: impl Into<Cow<'a, str>>, arguments: impl Into<Cow<'a, str>>) {
        self.fixed += TOKENS_PER_TOOL_CALL;
        self.text(name);
        self.text(arguments);
    }

    /// A function in `tools`; its properties follow through [`Self::property`].
    pub fn function(&mut self, name: &str, description: &str) {
        self.functions += 1;
        let description = description.strip_suffix('.').unwrap_or(description);
        self.text(format!("{name}:{description}"));
    }

    /// Marks that the current function has properties (counted once each).
    pub fn properties(&mut self) {
        self.fixed += PROPERTIES_INIT;
    }

    pub fn property(&mut self, name: &str, kind: &str, description: &str) {
        self.fixed += PROPERTY_KEY;
        let description = description.strip_suffix('.').unwrap_or(description);
        self.text(format!("{name}:{kind}:{description}"));
    }

    /// The `enum` of the current property.
    pub fn enum_items<I, S>(&mut self, items: I)
    where
        I: IntoIterator<Item = S>,
        S: Into<Cow<'a, str>>,
    {
        self.fixed += ENUM_INIT;
        for item in items {
            self.fixed += ENUM_ITEM;
            self.text(item);
        }
    }

    pub fn count(&self, encoding: Encoding) -> u64 {
        let texts: usize = self.texts.iter().map(|t| encoding.count(t)).sum();
        let function_init = match encoding {
            Encoding::O200kBase => FUNCTION_INIT_O200K,
            Encoding::Cl100kBase => FUNCTION_INIT_CL100K,
        };
        let functions = if self.functions > 0 {
            self.functions * function_init + FUNCTIONS_END
        } else {
            0
        };
        let total = texts as i64 + self.fixed + functions + REPLY_PRIMING_TOKENS;
        total.max(0) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const O200K: Encoding = Encoding::O200kBase;

    #[test]
    fn cookbook_example_messages() {
        // The cookbook's example conversation: 129 prompt tokens for gpt-4o
        // and gpt-4o-mini, 129 for gpt-4 and gpt-3.5-turbo as well.
        let messages: &[&[(&str, &str)]] = &[
            &[("role", "system"), ("content", "You are a helpful, pattern-following assistant that translates corporate jargon into plain English.")],
            &[("role", "system"), ("name", "example_user"), ("content", "New synergies will help drive top-line growth.")],
            &[("role", "system"), ("name", "example_assistant"), ("content", "Things working well together will increase revenue.")],
            &[("role", "system"), ("name", "example_user"), ("content", "Let's circle back when we have more bandwidth to touch base on opportunities for increased leverage.")],
            &[("role", "system"), ("name", "example_assistant"), ("content", "Let's talk later when we're less busy about how to do better.")],
            &[("role", "user"), ("content", "This late pivot means we don't have time to boil the ocean for the client deliverable.")],
        ];
        let mut prompt = ChatPrompt::new();
        for message in messages {
            prompt.message();
            for &(key, value) in *message {
                prompt.string_field(key, value);
            }
        }
        assert_eq!(prompt.count(O200K), 124);
        assert_eq!(prompt.count(Encoding::Cl100kBase), 129);
    }

    #[test]
    fn empty_prompt_is_the_reply_priming() {
        assert_eq!(ChatPrompt::new().count(O200K), 3);
    }

    #[test]
    fn name_adds_one() {
        let mut a = ChatPrompt::new();
        a.message();
        a.string_field("role", "user");
        let mut b = ChatPrompt::new();
        b.message();
        b.string_field("role", "user");
        b.string_field("name", "user");
        // "user" is one token.
        assert_eq!(b.count(O200K), a.count(O200K) + 2);
    }

    #[test]
    fn images_and_tool_calls_are_fixed_estimates() {
        let mut p = ChatPrompt::new();
        p.message();
        p.image_part(Some("low"));
        p.image_part(Some("high"));
        p.image_part(None);
        assert_eq!(p.count(O200K), 3 + 85 + 765 + 765 + 3);
        let mut p = ChatPrompt::new();
        p.tool_call("get_weather", "{}");
        let inner = O200K.count("get_weather") + O200K.count("{}");
        assert_eq!(p.count(O200K), 3 + inner as u64 + 3);
    }

    #[test]
    fn tools_follow_the_cookbook() {
        // The cookbook's get_current_weather example: its tools add
        // 7 + 12 + tokens of the two lines + properties and enum overheads.
        let mut p = ChatPrompt::new();
        p.function(
            "get_current_weather",
            "Get the current weather in a given location",
        );
        p.properties();
        p.property(
            "location",
            "string",
            "The city and state, e.g. San Francisco, CA",
        );
        p.property("unit", "string", "");
        p.enum_items(["celsius", "fahrenheit"]);
        let lines = O200K.count("get_current_weather:Get the current weather in a given location")
            + O200K.count("location:string:The city and state, e.g. San Francisco, CA")
            + O200K.count("unit:string:")
            + O200K.count("celsius")
            + O200K.count("fahrenheit");
        let fixed = 7 + 3 + 3 + 3 - 3 + 3 + 3 + 12 + 3;
        assert_eq!(p.count(O200K), lines as u64 + fixed);
        // cl100k's per-function overhead is 10.
        let cl_lines = Encoding::Cl100kBase.count("unit:string:")
            + Encoding::Cl100kBase.count("celsius")
            + Encoding::Cl100kBase.count("fahrenheit");
        let mut q = ChatPrompt::new();
        q.function("f", "");
        q.properties();
        q.property("unit", "string", "");
        q.enum_items(["celsius", "fahrenheit"]);
        let f_line = Encoding::Cl100kBase.count("f:") as u64;
        assert_eq!(
            q.count(Encoding::Cl100kBase),
            f_line + cl_lines as u64 + 10 + 3 + 3 - 3 + 6 + 12 + 3
        );
    }

    #[test]
    fn description_trailing_dot_is_dropped() {
        let mut a = ChatPrompt::new();
        a.function("f", "Does things.");
        let mut b = ChatPrompt::new();
        b.function("f", "Does things");
        assert_eq!(a.count(O200K), b.count(O200K));
    }
}
