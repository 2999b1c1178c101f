//! Email rendering with arbitrary placeholder values, for every (kind, audience); HTML
//! escaping on its own (of the whole input).
//!
//! Input: `name=value` lines (an unknown name is a placeholder no template uses).
#![no_main]

use std::collections::BTreeMap;
use std::sync::OnceLock;

use connwatch::alert::templates::{TEMPLATES, Templates, escape_html};
use libfuzzer_sys::fuzz_target;

fn templates() -> &'static Templates {
    static LOADED: OnceLock<Templates> = OnceLock::new();
    LOADED.get_or_init(|| Templates::load(None).expect("the built-in templates"))
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let escaped = escape_html(text);
    assert!(!escaped.contains(['<', '>', '"', '\'']), "{escaped:?}");
    let values: BTreeMap<&str, String> = text
        .lines()
        .filter_map(|line| line.split_once('='))
        .map(|(name, value)| (name, value.to_owned()))
        .collect();
    for (kind, audience) in TEMPLATES {
        let rendered = templates()
            .render(*kind, *audience, &values)
            .expect("every part exists");
        assert!(!rendered.subject.contains('\n'), "{:?}", rendered.subject);
        // Markup in a value never reaches the HTML part raw: every `<` there comes from
        // the template itself (which has no script) or the pre-rendered digest list
        // (escaped where it is built, so it is left out here).
        let digest_has_script = values
            .get("connections_html")
            .is_some_and(|html| html.contains("<script"));
        if !digest_has_script {
            assert!(!rendered.html.contains("<script"), "a value raw in HTML");
        }
    }
});
