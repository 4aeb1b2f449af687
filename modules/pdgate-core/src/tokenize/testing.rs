//! A small model directory for tests and demos, trained here (no model hub).
//!
//! [`write_test_model`] trains a byte-level BPE (GPT-2/Qwen style: no
//! normalizer, byte-level pre-tokenizer without a prefix space) on this
//! repository's own documentation, embedded at compile time so it works
//! from any working directory, and writes `tokenizer.json` plus a
//! `tokenizer_config.json` with a ChatML template ([`CHAT_TEMPLATE`]).
//! Training is deterministic: the same corpus gives the same bytes.
//! Editing the embedded documents changes the vocabulary, so tests compare
//! against [`super::Model::encode`], never against literal ids (except the
//! special tokens, which always come first: [`SPECIAL_TOKENS`]).

use std::io;
use std::path::Path;

use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, DecoderWrapper, NormalizerWrapper, PostProcessorWrapper};
use tokenizers::{ModelWrapper, PreTokenizerWrapper, TokenizerImpl};

/// Special tokens, with ids 0, 1, 2...
pub const SPECIAL_TOKENS: [&str; 5] = ["<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"];

/// Target vocabulary size (special tokens, 256 bytes, merges).
pub const VOCAB_SIZE: usize = 3000;

/// The training text: the README and the design documents.
const CORPUS: [&str; 4] = [
    include_str!("../../../../README.md"),
    include_str!("../../../../docs/pd-flow.md"),
    include_str!("../../../../docs/balancers.md"),
    include_str!("../../../../docs/hold.md"),
];

/// A ChatML template as HF models write them: BOS first, tools as JSON in a
/// system turn, content as a string or a list of text parts, tool calls,
/// `raise_exception` for an unknown role, and the generation prompt.
pub const CHAT_TEMPLATE: &str = r#"{{- bos_token }}
{%- if tools %}
    {{- '<|im_start|>system\n# Tools\n' }}
    {%- for tool in tools %}
        {{- tool | tojson }}
        {{- '\n' }}
    {%- endfor %}
    {{- '<|im_end|>\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message['role'] not in ['system', 'user', 'assistant', 'tool'] %}
        {{- raise_exception('unknown role: ' + message['role']) }}
    {%- endif %}
    {{- '<|im_start|>' + message['role'] + '\n' }}
    {%- if message['content'] is string %}
        {{- message['content'] }}
    {%- else %}
        {%- for part in message['content'] %}
            {%- if part['type'] == 'text' %}
                {{- part['text'] }}
            {%- endif %}
        {%- endfor %}
    {%- endif %}
    {%- if message['tool_calls'] is defined %}
        {%- for call in message['tool_calls'] %}
            {{- '\n<tool_call>' + call['function']['name'] + ' ' + call['function']['arguments'] | tojson + '</tool_call>' }}
        {%- endfor %}
    {%- endif %}
    {{- '<|im_end|>\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"#;

/// Writes `tokenizer.json` and `tokenizer_config.json` into `dir` (created
/// if missing).
pub fn write_test_model(dir: &Path) -> io::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("tokenizer.json"), tokenizer_json()?)?;
    std::fs::write(dir.join("tokenizer_config.json"), tokenizer_config())?;
    Ok(())
}

/// The trained tokenizer, serialised as `tokenizer.json`.
pub fn tokenizer_json() -> io::Result<String> {
    let mut tok: TokenizerImpl<
        ModelWrapper,
        NormalizerWrapper,
        PreTokenizerWrapper,
        PostProcessorWrapper,
        DecoderWrapper,
    > = TokenizerImpl::new(BPE::default().into());
    tok.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    tok.with_decoder(Some(ByteLevel::new(false, true, true)));

    let specials = SPECIAL_TOKENS.iter().map(|t| AddedToken::from(*t, true)).collect();
    let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
        .show_progress(false)
        .vocab_size(VOCAB_SIZE)
        .min_frequency(2)
        .special_tokens(specials)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build()
        .into();
    let lines = CORPUS.iter().flat_map(|doc| doc.lines()).filter(|l| !l.trim().is_empty());
    tok.train(&mut trainer, lines).map_err(io::Error::other)?;

    // `add_special_tokens=true` puts BOS first, like Llama's tokenizers.
    let bos = SPECIAL_TOKENS[0];
    let post = TemplateProcessing::builder()
        .try_single(vec![format!("{bos}:0"), "$A:0".to_owned()])
        .map_err(io::Error::other)?
        .try_pair(vec![
            format!("{bos}:0"),
            "$A:0".to_owned(),
            format!("{bos}:1"),
            "$B:1".to_owned(),
        ])
        .map_err(io::Error::other)?
        .special_tokens(vec![(bos.to_owned(), 0u32)])
        .build()
        .map_err(io::Error::other)?;
    tok.with_post_processor(Some(post));
    tok.to_string(false).map_err(io::Error::other)
}

/// `tokenizer_config.json`: the ChatML template, BOS/EOS as an
/// AddedToken object and a string (both forms occur in the wild).
pub fn tokenizer_config() -> String {
    let cfg = serde_json::json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": {"__type": "AddedToken", "content": "<s>", "special": true},
        "eos_token": "<|im_end|>",
        "pad_token": "<pad>",
        "add_bos_token": false,
        "model_max_length": 4096,
        "chat_template": CHAT_TEMPLATE,
    });
    serde_json::to_string_pretty(&cfg).unwrap_or_default()
}
