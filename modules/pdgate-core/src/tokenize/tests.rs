//! Tests against the trained test model ([`super::testing`]).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use super::testing::{self, SPECIAL_TOKENS};
use super::*;

/// A scratch directory, unique per process and test, removed when dropped.
struct Scratch(PathBuf);

impl std::ops::Deref for Scratch {
    type Target = Path;

    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn scratch(name: &str) -> Scratch {
    let dir = std::env::temp_dir().join(format!("pdgate-tokenize-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    Scratch(dir)
}

/// The test model's files, trained once per test binary.
fn model_files() -> &'static (String, String) {
    static FILES: OnceLock<(String, String)> = OnceLock::new();
    FILES.get_or_init(|| (testing::tokenizer_json().unwrap(), testing::tokenizer_config()))
}

/// A directory holding the test model, with `config` as its
/// tokenizer_config.json when given.
fn model_dir(name: &str, config: Option<&str>) -> Scratch {
    let dir = scratch(name);
    let (tok, cfg) = model_files();
    std::fs::write(dir.join("tokenizer.json"), tok).unwrap();
    std::fs::write(dir.join("tokenizer_config.json"), config.unwrap_or(cfg)).unwrap();
    dir
}

fn model() -> &'static Model {
    static MODEL: OnceLock<Model> = OnceLock::new();
    MODEL.get_or_init(|| Model::load(&model_dir("shared", None)).unwrap())
}

/// A model whose tokenizer_config.json has `template` as its chat template.
fn model_with_template(name: &str, template: &str) -> Model {
    let cfg = serde_json::json!({"bos_token": "<s>", "eos_token": "<|im_end|>", "chat_template": template});
    Model::load(&model_dir(name, Some(&cfg.to_string()))).unwrap()
}

fn chat(body: &serde_json::Value) -> Result<String, PromptError> {
    model().chat_prompt(body.to_string().as_bytes())
}

fn tokens(body: &serde_json::Value) -> Result<Vec<u32>, PromptError> {
    model().prompt_tokens(body.to_string().as_bytes())
}

fn id(token: &str) -> u32 {
    model().token_id(token).unwrap()
}

#[test]
fn training_is_deterministic_and_quick() {
    let t = std::time::Instant::now();
    let a = testing::tokenizer_json().unwrap();
    let took = t.elapsed();
    let b = testing::tokenizer_json().unwrap();
    assert_eq!(a, b, "two trainings differ");
    eprintln!("training the test tokenizer took {took:?} ({} bytes)", a.len());
    let dir = scratch("written");
    testing::write_test_model(&dir).unwrap();
    assert_eq!(std::fs::read_to_string(dir.join("tokenizer.json")).unwrap(), a);
    let m = Model::load(&dir).unwrap();
    assert!(m.vocab_size() > 2000 && m.vocab_size() <= testing::VOCAB_SIZE, "{}", m.vocab_size());
    for (i, t) in SPECIAL_TOKENS.iter().enumerate() {
        assert_eq!(m.token_id(t), Some(i as u32), "{t}");
    }
}

#[test]
fn chat_renders_like_transformers() {
    let body = serde_json::json!({"model": "m", "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "How are prefill and decode split?"},
        {"role": "assistant", "content": "By pd_prefill_pass."},
        {"role": "user", "content": [{"type": "text", "text": "And"}, {"type": "text", "text": "the KV?"}]},
    ]});
    let expected = "<s><|im_start|>system\nBe brief.<|im_end|>\n\
        <|im_start|>user\nHow are prefill and decode split?<|im_end|>\n\
        <|im_start|>assistant\nBy pd_prefill_pass.<|im_end|>\n\
        <|im_start|>user\nAndthe KV?<|im_end|>\n\
        <|im_start|>assistant\n";
    assert_eq!(chat(&body).unwrap(), expected);

    // Without the generation prompt.
    let mut body = body;
    body["add_generation_prompt"] = false.into();
    assert!(chat(&body).unwrap().ends_with("the KV?<|im_end|>\n"));
}

#[test]
fn chat_tokens_are_the_rendered_text_without_added_specials() {
    let body = serde_json::json!({"messages": [
        {"role": "user", "content": "Route the prompt to the least loaded prefill engine."},
    ]});
    let text = chat(&body).unwrap();
    let ids = tokens(&body).unwrap();
    assert_eq!(ids, model().encode(&text, false).unwrap());
    assert_eq!(ids[0], id("<s>"), "BOS comes from the template, once");
    assert_ne!(ids[1], id("<s>"));
    assert_eq!(ids[1], id("<|im_start|>"));
    assert_eq!(ids.iter().filter(|&&i| i == id("<|im_start|>")).count(), 2);
    assert_eq!(ids.iter().filter(|&&i| i == id("<|im_end|>")).count(), 1);

    // add_special_tokens=true on a chat request adds the post-processor's BOS.
    let mut body = body;
    body["add_special_tokens"] = true.into();
    let with = tokens(&body).unwrap();
    assert_eq!(with[0], id("<s>"));
    assert_eq!(&with[1..], &ids[..]);
}

#[test]
fn completions_follow_add_special_tokens() {
    let text = "The proxy hashes prompt blocks the way vLLM does.";
    let plain = model().encode(text, false).unwrap();
    let ids = tokens(&serde_json::json!({"model": "m", "prompt": text})).unwrap();
    assert_eq!(ids[0], id("<s>"), "completions add BOS by default");
    assert_eq!(&ids[1..], &plain[..]);
    let ids = tokens(&serde_json::json!({"prompt": text, "add_special_tokens": false})).unwrap();
    assert_eq!(ids, plain);
    assert_eq!(model().count(text).unwrap(), plain.len());

    // Batches: the first prompt.
    let ids = tokens(&serde_json::json!({"prompt": [text, "second"]})).unwrap();
    assert_eq!(&ids[1..], &plain[..]);
    // Special-token text in a prompt is the special token.
    let ids =
        tokens(&serde_json::json!({"prompt": "<|im_start|>user", "add_special_tokens": false}));
    assert_eq!(ids.unwrap()[0], id("<|im_start|>"));
}

#[test]
fn prompt_token_ids_are_used_as_given() {
    assert_eq!(tokens(&serde_json::json!({"prompt": [5, 17, 2999]})).unwrap(), vec![5, 17, 2999]);
    assert_eq!(tokens(&serde_json::json!({"prompt": [[7, 8], [9]]})).unwrap(), vec![7, 8]);
    let too_big = model().vocab_size() as u64;
    let e = tokens(&serde_json::json!({"prompt": [1, too_big]})).unwrap_err();
    assert_eq!(e.to_string(), format!("prompt token id {too_big} is out of vocabulary"));
    assert!(matches!(
        tokens(&serde_json::json!({"prompt": [1, -2]})),
        Err(PromptError::Invalid(_))
    ));
    assert!(matches!(
        tokens(&serde_json::json!({"prompt": [1, 2.5]})),
        Err(PromptError::Invalid(_))
    ));
    assert_eq!(
        tokens(&serde_json::json!({"prompt": []})).unwrap_err().to_string(),
        "prompt is empty"
    );
    // truncate_prompt_tokens keeps the last k.
    let body = serde_json::json!({"prompt": [1, 2, 3, 4, 5], "truncate_prompt_tokens": 2});
    assert_eq!(tokens(&body).unwrap(), vec![4, 5]);
    let body = serde_json::json!({"prompt": [1, 2, 3], "truncate_prompt_tokens": -1});
    assert_eq!(tokens(&body).unwrap(), vec![1, 2, 3]);
}

#[test]
fn content_parts_follow_the_content_format() {
    // The test template loops over message['content']: vLLM's "openai" format.
    assert_eq!(model().content_format(false), Some(ContentFormat::OpenAi));
    let body = serde_json::json!({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "one"},
        "two",
        {"type": "text", "text": null},
        {"type": "input_text", "text": "three"},
    ]}], "add_generation_prompt": false});
    assert_eq!(chat(&body).unwrap(), "<s><|im_start|>user\nonetwothree<|im_end|>\n");

    // As "string", vLLM joins the text parts with newlines.
    let mut m = model_with_template("string-format", testing::CHAT_TEMPLATE);
    m.set_content_format(ContentFormat::String);
    let text = m.chat_prompt(body.to_string().as_bytes()).unwrap();
    assert_eq!(text, "<s><|im_start|>user\none\ntwo\nthree<|im_end|>\n");

    // A template that prints content directly gets a string.
    let m = model_with_template("print", "{% for m in messages %}[{{ m.content }}]{% endfor %}");
    assert_eq!(m.content_format(false), Some(ContentFormat::String));
    let body = serde_json::json!({"messages": [
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": null},
    ]});
    assert_eq!(m.chat_prompt(body.to_string().as_bytes()).unwrap(), "[a\nb][]");

    // Multimodal parts cannot be reproduced.
    let body = serde_json::json!({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}},
    ]}]});
    let e = tokens(&body).unwrap_err();
    assert!(matches!(e, PromptError::Unsupported(_)), "{e:?}");
    assert_eq!(
        e.to_string(),
        "not supported: messages[0].content[1] is a multimodal part (\"image_url\")"
    );
}

#[test]
fn tools_reach_the_template_as_vllm_dumps_them() {
    let body = serde_json::json!({"messages": [{"role": "user", "content": "weather?"}],
        "tools": [{"type": "function", "function": {"name": "get_weather",
            "parameters": {"type": "object", "properties": {"zip": {"type": "string"}, "city": {"type": "string"}},
                "required": ["city"]}, "strict": true}}]});
    // serde_json's json! sorts keys; send the client's order as text.
    let text = body.to_string().replace(
        r#"{"city":{"type":"string"},"zip":{"type":"string"}}"#,
        r#"{"zip":{"type":"string"},"city":{"type":"string"}}"#,
    );
    let rendered = model().chat_prompt(text.as_bytes()).unwrap();
    let tool = r#"{"type": "function", "function": {"name": "get_weather", "description": null, "parameters": {"properties": {"zip": {"type": "string"}, "city": {"type": "string"}}, "required": ["city"], "type": "object"}, "strict": true}}"#;
    assert_eq!(rendered, format!("<s><|im_start|>system\n# Tools\n{tool}\n<|im_end|>\n<|im_start|>user\nweather?<|im_end|>\n<|im_start|>assistant\n"));

    // An assistant's tool-call arguments string is parsed, as vLLM does.
    let body = serde_json::json!({"messages": [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "type": "function",
            "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\", \"days\": 2.0}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": [{"type": "text", "text": "sunny"}]},
    ], "add_generation_prompt": false});
    let rendered = chat(&body).unwrap();
    assert!(
        rendered.contains("<|im_start|>assistant\n\n<tool_call>get_weather {\"city\": \"Paris\", \"days\": 2.0}</tool_call><|im_end|>\n"),
        "{rendered}"
    );
    // A tool message's text parts become one string.
    assert!(rendered.ends_with("<|im_start|>tool\nsunny<|im_end|>\n"), "{rendered}");

    // Bad tools are refused like vLLM's validation would.
    let e =
        tokens(&serde_json::json!({"messages": [], "tools": [{"type": "function"}]})).unwrap_err();
    assert_eq!(e.to_string(), "tools[0].function is missing");
}

#[test]
fn key_order_does_not_change_the_tokens() {
    let a = r#"{"model":"m","messages":[{"role":"system","content":"Be brief.","name":"ops"},{"role":"user","content":[{"type":"text","text":"hi"}]}],"max_tokens":5,"chat_template_kwargs":{"x":1,"y":2}}"#;
    let b = r#"{"chat_template_kwargs":{"y":2,"x":1},"max_tokens":5,"messages":[{"name":"ops","content":"Be brief.","role":"system"},{"content":[{"text":"hi","type":"text"}],"role":"user"}],"model":"m"}"#;
    let ta = model().prompt_tokens(a.as_bytes()).unwrap();
    assert_eq!(ta, model().prompt_tokens(b.as_bytes()).unwrap());
    // ...and a template that prints a message sees vLLM's key order.
    let m = model_with_template("repr", "{{ messages[0] }}|{{ messages[1] }}");
    let want = "{'role': 'system', 'content': 'Be brief.', 'name': 'ops'}|{'role': 'user', 'content': 'hi'}";
    assert_eq!(m.chat_prompt(a.as_bytes()).unwrap(), want);
    assert_eq!(m.chat_prompt(b.as_bytes()).unwrap(), want);
}

#[test]
fn template_errors_are_prompt_errors() {
    let body = serde_json::json!({"messages": [{"role": "robot", "content": "beep"}]});
    let e = tokens(&body).unwrap_err();
    assert_eq!(e, PromptError::Rejected("unknown role: robot".into()));
    assert_eq!(e.to_string(), "the chat template rejected the request: unknown role: robot");

    // From inside a macro too.
    let m = model_with_template(
        "raise-in-macro",
        "{% macro check(m) %}{{ raise_exception('bad ' ~ m.role) }}{% endmacro %}{{ check(messages[0]) }}",
    );
    let e = m.prompt_tokens(br#"{"messages":[{"role":"user","content":"x"}]}"#).unwrap_err();
    assert_eq!(e, PromptError::Rejected("bad user".into()));

    let m = model_with_template("undefined-call", "{{ messages[0].content.nope() }}");
    let e = m.prompt_tokens(br#"{"messages":[{"role":"user","content":"x"}]}"#).unwrap_err();
    assert!(matches!(e, PromptError::Template(_)), "{e:?}");
    assert!(e.to_string().starts_with("chat template error: "), "{e}");
}

#[test]
fn hostile_templates_are_bounded() {
    let body = br#"{"messages":[{"role":"user","content":"x"}]}"#;
    let huge =
        model_with_template("huge", "{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}");
    let t = std::time::Instant::now();
    let e = huge.prompt_tokens(body).unwrap_err();
    assert_eq!(
        e,
        PromptError::TooLarge { limit: body.len() * OUTPUT_PER_BODY_BYTE + OUTPUT_SLACK }
    );
    let spin = model_with_template(
        "spin",
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    );
    let e = spin.prompt_tokens(body).unwrap_err();
    assert!(e.to_string().contains("range() produced more than"), "{e}");
    let deep =
        model_with_template("deep", "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}");
    let e = deep.prompt_tokens(body).unwrap_err();
    assert!(matches!(e, PromptError::Template(_)), "{e:?}");
    assert!(t.elapsed() < std::time::Duration::from_secs(20), "{:?}", t.elapsed());
}

#[test]
fn bad_bodies_are_prompt_errors() {
    let m = model();
    let cases: &[(&[u8], &str)] = &[
        (b"", "body is empty"),
        (b"[1]", "top-level JSON value is not an object"),
        (b"{\"messages\": [", "invalid JSON: expected a JSON value at byte 14"),
        (b"{\"model\":\"m\"}", "request has neither \"messages\" nor \"prompt\""),
        (b"{\"messages\":{}}", "messages must be a list"),
        (b"{\"messages\":[1]}", "messages[0] is not an object"),
        (b"{\"messages\":[{\"role\":\"user\",\"content\":\"a\"},{\"content\":\"b\"}]}", "messages[1].role is missing"),
        (b"{\"messages\":[{\"role\":7}]}", "messages[0].role must be a string"),
        (b"{\"messages\":[{\"role\":\"user\",\"content\":5}]}", "messages[0].content must be a string, a list of content parts or null"),
        (b"{\"messages\":[{\"role\":\"user\",\"content\":[{\"text\":\"a\"}]}]}", "messages[0].content[0].type is missing"),
        (b"{\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":\"blob\"}]}]}", "messages[0].content[0].type \"blob\" is not a supported content part type"),
        (b"{\"messages\":[],\"chat_template\":\"{{ 1 }}\"}", "not supported: a chat_template in the request"),
        (b"{\"messages\":[],\"add_generation_prompt\":\"yes\"}", "add_generation_prompt must be a boolean"),
        (b"{\"messages\":[],\"chat_template_kwargs\":{\"tokenize\":true}}", "chat_template_kwargs may not set \"tokenize\""),
        (b"{\"messages\":[],\"continue_final_message\":true}", "cannot set both continue_final_message and add_generation_prompt to true"),
        (b"{\"prompt\":{}}", "prompt must be a string, a list of strings, a list of token ids or a list of token id lists"),
        (b"{\"prompt\":\"x\",\"prompt_embeds\":\"AAAA\"}", "not supported: prompt_embeds"),
        (b"{\"prompt\":\"x\",\"truncate_prompt_tokens\":-5}", "truncate_prompt_tokens must be an integer of at least -1"),
    ];
    for (body, want) in cases {
        let got = m.prompt_tokens(body).map(|_| ()).unwrap_err().to_string();
        assert_eq!(&got, want, "body {}", String::from_utf8_lossy(body));
    }
}

#[test]
fn continue_final_message_stops_inside_the_last_turn() {
    let body = serde_json::json!({"messages": [
        {"role": "user", "content": "Count to three."},
        {"role": "assistant", "content": "One, two,"},
    ], "add_generation_prompt": false, "continue_final_message": true});
    assert_eq!(
        chat(&body).unwrap(),
        "<s><|im_start|>user\nCount to three.<|im_end|>\n<|im_start|>assistant\nOne, two,"
    );
    // A template that trims the message: the marker's space goes, and so
    // does the trailing space of the text.
    let m =
        model_with_template("trim", "{% for m in messages %}<{{ m.content | trim }}>{% endfor %}");
    let body = serde_json::json!({"messages": [{"role": "assistant", "content": "So far "}],
        "add_generation_prompt": false, "continue_final_message": true});
    assert_eq!(m.chat_prompt(body.to_string().as_bytes()).unwrap(), "<So far");
}

#[test]
fn chat_template_kwargs_become_variables() {
    let m = model_with_template(
        "kwargs",
        "{% if enable_thinking is defined and not enable_thinking %}/no_think {% endif %}{{ messages[0].content }}{% if add_generation_prompt %}>{% endif %}",
    );
    let render = |kw: serde_json::Value| {
        let body = serde_json::json!({"messages": [{"role": "user", "content": "q"}], "chat_template_kwargs": kw});
        m.chat_prompt(body.to_string().as_bytes()).unwrap()
    };
    assert_eq!(render(serde_json::json!({})), "q>");
    assert_eq!(render(serde_json::json!({"enable_thinking": false})), "/no_think q>");
    assert_eq!(render(serde_json::json!({"add_generation_prompt": false})), "q");
}

#[test]
fn templates_see_python_behaviour() {
    let m = model_with_template(
        "python",
        concat!(
            "{{ messages[0].content.strip().upper() }}|{{ messages[0].content.startswith(' a') }}|",
            "{{ messages | length }}|{{ messages[-1].role }}|{{ 1e-5 }}|{{ 2.0 }}|{{ none }}|{{ [1, 'a'] }}|",
            "{% for k, v in messages[0].items() %}{{ k }}={{ v | tojson }};{% endfor %}|",
            "{{ {'b': 1} | tojson(indent=2) }}|{{ bos_token }}|{{ 'é' | tojson(ensure_ascii=true) }}|",
            "{% for x in [1, 2, 3] %}{% if x == 2 %}{% continue %}{% endif %}{{ x }}{% endfor %}|",
            "{{ 'role' in messages[0] }}{{ 'name' in messages[0] }}|{{ messages[0].get('name', 'anon') }}|",
            "{{ messages[0] is mapping }}{{ messages is sequence }}|{{ messages[1:] | map(attribute='role') | join(',') }}",
        ),
    );
    let body =
        br#"{"messages":[{"role":"user","content":" abc "},{"role":"assistant","content":"x"}]}"#;
    assert_eq!(
        m.chat_prompt(body).unwrap(),
        "ABC|True|2|assistant|1e-05|2.0|None|[1, 'a']|role=\"user\";content=\" abc \";|{\n  \"b\": 1\n}|<s>|\"\\u00e9\"|13|TrueFalse|anon|TrueTrue|assistant"
    );
    // strftime_now renders today's date.
    let m = model_with_template("date", "{{ strftime_now('%Y') }}");
    let year: i64 = m.chat_prompt(br#"{"messages":[]}"#).unwrap().parse().unwrap();
    assert!(year >= 2025, "{year}");
    // transformers' {% generation %} blocks render their body.
    let m = model_with_template(
        "generation",
        "{%- for m in messages %}{% generation %}[{{ m.content }}]{% endgeneration %}{% endfor %}",
    );
    assert_eq!(m.chat_prompt(br#"{"messages":[{"role":"user","content":"x"}]}"#).unwrap(), "[x]");
}

#[test]
fn missing_or_broken_files_name_the_file() {
    let dir = scratch("empty");
    let e = Model::load(&dir).err().unwrap();
    assert_eq!(
        e.to_string(),
        format!("\"{}\": cannot read: no such file", dir.join("tokenizer.json").display())
    );

    std::fs::write(dir.join("tokenizer.json"), "not json").unwrap();
    let e = Model::load(&dir).err().unwrap();
    assert_eq!(e.path, dir.join("tokenizer.json"));
    assert_eq!(
        e.to_string(),
        format!("\"{}\": expected ident at line 1 column 2", e.path.display())
    );

    let dir = model_dir("bad-config", Some("{\"chat_template\": 5}"));
    let e = Model::load(&dir).err().unwrap();
    assert_eq!(
        e.to_string(),
        format!(
            "\"{}\": chat_template is neither a string nor a list",
            dir.join("tokenizer_config.json").display()
        )
    );

    let dir = model_dir("bad-template", Some("{\"chat_template\": \"{% for m in messages %}\"}"));
    let e = Model::load(&dir).err().unwrap().to_string();
    assert!(
        e.starts_with(&format!(
            "\"{}\": chat template: syntax error",
            dir.join("tokenizer_config.json").display()
        )),
        "{e}"
    );
    assert!(!e.contains('\n'));

    let dir = model_dir("bad-jinja", None);
    std::fs::write(dir.join("chat_template.jinja"), "{{ x").unwrap();
    let e = Model::load(&dir).err().unwrap();
    assert_eq!(e.path, dir.join("chat_template.jinja"));
}

#[test]
fn template_sources_and_config_forms() {
    // chat_template.jinja wins over tokenizer_config.json.
    let dir = model_dir("jinja-file", None);
    std::fs::write(dir.join("chat_template.jinja"), "J{{ messages | length }}").unwrap();
    let m = Model::load(&dir).unwrap();
    assert_eq!(m.chat_prompt(br#"{"messages":[]}"#).unwrap(), "J0");

    // A list of named templates: "default", and "tool_use" for requests with tools.
    let cfg = serde_json::json!({"chat_template": [
        {"name": "default", "template": "D"}, {"name": "tool_use", "template": "T{{ tools | length }}"}],
        "eos_token": {"content": "</s>", "lstrip": false}});
    let m = Model::load(&model_dir("named", Some(&cfg.to_string()))).unwrap();
    assert_eq!(m.eos_token(), Some("</s>"));
    assert_eq!(m.chat_prompt(br#"{"messages":[]}"#).unwrap(), "D");
    let with_tools = br#"{"messages":[],"tools":[{"type":"function","function":{"name":"f"}}]}"#;
    assert_eq!(m.chat_prompt(with_tools).unwrap(), "T1");

    // No template at all: chat is refused, completions work.
    let m = Model::load(&model_dir("no-template", Some("{}"))).unwrap();
    assert!(!m.has_chat_template());
    assert_eq!(m.prompt_tokens(br#"{"messages":[]}"#), Err(PromptError::NoChatTemplate));
    assert!(m.prompt_tokens(br#"{"prompt":"hello"}"#).is_ok());
}

#[test]
fn llama_classes_take_bos_and_eos_from_the_flags() {
    let cfg = serde_json::json!({"tokenizer_class": "LlamaTokenizerFast", "bos_token": "<s>",
        "eos_token": "</s>", "add_bos_token": true, "add_eos_token": true});
    let m = Model::load(&model_dir("llama", Some(&cfg.to_string()))).unwrap();
    let plain = m.encode("hello", false).unwrap();
    let ids = m.encode("hello", true).unwrap();
    assert_eq!(ids.first(), Some(&m.token_id("<s>").unwrap()));
    assert_eq!(ids.last(), Some(&m.token_id("</s>").unwrap()));
    assert_eq!(&ids[1..ids.len() - 1], &plain[..]);

    let cfg = serde_json::json!({"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "add_bos_token": false});
    let m = Model::load(&model_dir("llama-nobos", Some(&cfg.to_string()))).unwrap();
    assert_eq!(m.encode("hello", true).unwrap(), m.encode("hello", false).unwrap());

    let cfg = serde_json::json!({"tokenizer_class": "LlamaTokenizer", "bos_token": "<nope>"});
    let dir = model_dir("llama-bad", Some(&cfg.to_string()));
    let e = Model::load(&dir).err().unwrap().to_string();
    assert!(e.ends_with("bos_token \"<nope>\" is not in the vocabulary"), "{e}");
}

/// Render + encode speed: `cargo test --release -p pdgate-core
/// tokenize::tests::speed -- --ignored --nocapture --test-threads=1`.
#[test]
#[ignore]
fn speed() {
    use tokenizers::{OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer};
    let m = model();
    let text: String = include_str!("../../../../docs/kubernetes.md").chars().take(6000).collect();
    let messages: Vec<_> = (0..8)
        .map(|i| {
            let role = ["user", "assistant"][i % 2];
            serde_json::json!({"role": role, "content": text})
        })
        .collect();
    let body = serde_json::json!({"messages": messages}).to_string();
    let prompt = m.chat_prompt(body.as_bytes()).unwrap();
    let n = m.prompt_tokens(body.as_bytes()).unwrap().len();
    let rounds = 50;
    let time = |f: &dyn Fn()| {
        let t = std::time::Instant::now();
        for _ in 0..rounds {
            f();
        }
        t.elapsed() / rounds
    };
    let all = time(&|| drop(std::hint::black_box(m.prompt_tokens(body.as_bytes()).unwrap())));
    let render = time(&|| drop(std::hint::black_box(m.chat_prompt(body.as_bytes()).unwrap())));
    let encode = time(&|| drop(std::hint::black_box(m.encode(&prompt, false).unwrap())));
    let split = time(&|| {
        let mut pts = PreTokenizedString::from(prompt.as_str());
        m.tokenizer.get_pre_tokenizer().unwrap().pre_tokenize(&mut pts).unwrap();
        std::hint::black_box(pts.get_splits(OffsetReferential::Original, OffsetType::None).len());
    });
    let per_k = |d: std::time::Duration| d.as_secs_f64() * 1e6 / (n as f64 / 1000.0);
    eprintln!(
        "{} body bytes, {n} tokens: {all:?} per request = {:.1} us per 1k tokens \
         (parse + render {render:?} = {:.1} us/1k; encode {encode:?}, of which the \
         pre-tokenizer regex {split:?})",
        body.len(),
        per_k(all),
        per_k(render),
    );
}

#[test]
fn qwen3_style_template_features() {
    let m = model_with_template(
        "qwen3",
        r#"{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if message.role == "assistant" %}
        {%- if '</think>' in content %}
            {%- set content = content.split('</think>')[-1].lstrip('\n') %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {{- '<|im_start|>assistant\n<think>\n' + (message.reasoning_content or '').strip('\n') + '\n</think>\n\n' + content + '<|im_end|>\n' }}
        {%- else %}
            {{- '<|im_start|>assistant\n' + content + '<|im_end|>\n' }}
        {%- endif %}
    {%- else %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}"#,
    );
    assert_eq!(m.content_format(false), Some(ContentFormat::String));
    let body = serde_json::json!({"messages": [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "<think>\nadd\n</think>\n\n4"},
        {"role": "user", "content": "and 3+3?"},
        {"role": "assistant", "content": "6", "reasoning_content": "\nadd again\n"},
    ], "chat_template_kwargs": {"enable_thinking": false}});
    assert_eq!(
        m.chat_prompt(body.to_string().as_bytes()).unwrap(),
        "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n\
         <|im_start|>user\nand 3+3?<|im_end|>\n\
         <|im_start|>assistant\n<think>\nadd again\n</think>\n\n6<|im_end|>\n\
         <|im_start|>assistant\n<think>\n\n</think>\n\n"
    );
}
