//! `{{VARIABLE}}` templates.
//!
//! Rendering is a single pass over the template: a value that itself contains `{{...}}` is
//! inserted literally and never rendered again, and unknown names render as they were.

use std::collections::BTreeMap;

/// The names used in `template`, in order of appearance.
pub fn placeholders(template: &str) -> Vec<&str> {
    let mut names = Vec::new();
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        let after = &rest[start + 2..];
        match after.find("}}") {
            Some(end) => {
                names.push(after[..end].trim());
                rest = &after[end + 2..];
            }
            None => break,
        }
    }
    names
}

/// Renders `template`, replacing each `{{NAME}}` whose name is in `values`.
pub fn render(template: &str, values: &BTreeMap<String, String>) -> String {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        match after.find("}}") {
            Some(end) => {
                let name = after[..end].trim();
                match values.get(name) {
                    Some(value) => out.push_str(value),
                    None => out.push_str(&rest[start..start + 2 + end + 2]),
                }
                rest = &after[end + 2..];
            }
            None => {
                out.push_str(&rest[start..]);
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_once_and_literally() {
        let mut v = BTreeMap::new();
        v.insert("A".to_string(), "{{B}}".to_string());
        v.insert("B".to_string(), "secret".to_string());
        assert_eq!(
            render("x {{A}} y {{ B }} {{C}} {{", &v),
            "x {{B}} y secret {{C}} {{"
        );
        assert_eq!(placeholders("{{A}}-{{ B }}-{{"), vec!["A", "B"]);
    }
}
