//! Key names: the conventions teams already use, as functions.
//!
//! - Segments joined by `:` (`{service}:{feature}:{tenant}:{entity}`).
//! - Django's versioned cache keys, `prefix:version:key` (`bisk:1:user:7`).
//! - Templates such as `service_playlist:{genre}:*`, filled from config and
//!   event data. When a template becomes a glob, the values are escaped so a
//!   value containing `*` cannot widen the pattern.

use std::fmt;

use crate::glob;

/// The separator between key segments, the convention of Redis's own
/// documentation and of most applications.
pub const SEPARATOR: char = ':';

/// Join segments with `:`.
///
/// ```
/// use cachepol_guest_sdk::keys;
/// assert_eq!(keys::join(["music", "playlist", "acme", "42"]), "music:playlist:acme:42");
/// ```
pub fn join<I, S>(segments: I) -> String
where
    I: IntoIterator<Item = S>,
    S: AsRef<str>,
{
    let mut out = String::new();
    for (i, segment) in segments.into_iter().enumerate() {
        if i > 0 {
            out.push(SEPARATOR);
        }
        out.push_str(segment.as_ref());
    }
    out
}

/// Split a key into its `:` segments; empty segments are kept, so a
/// schema check sees `a::b` as three segments.
///
/// ```
/// use cachepol_guest_sdk::keys;
/// assert_eq!(keys::segments("a::b").collect::<Vec<_>>(), ["a", "", "b"]);
/// ```
pub fn segments(key: &str) -> impl Iterator<Item = &str> {
    key.split(SEPARATOR)
}

/// Django's `make_key`: `prefix:version:key`.
///
/// ```
/// use cachepol_guest_sdk::keys;
/// assert_eq!(keys::versioned("bisk", 2, "user:7"), "bisk:2:user:7");
/// ```
pub fn versioned(prefix: &str, version: u32, key: &str) -> String {
    format!("{prefix}{SEPARATOR}{version}{SEPARATOR}{key}")
}

/// A key in Django's `prefix:version:key` form, taken apart by
/// [`parse_versioned`]; it borrows from the key.
///
/// ```
/// use cachepol_guest_sdk::keys::{Versioned, parse_versioned};
/// let v: Versioned = parse_versioned("bisk:1:user:7").unwrap();
/// assert!(v.version < 2, "an old version's key");
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Versioned<'a> {
    /// Django's `KEY_PREFIX`; empty by default.
    pub prefix: &'a str,
    /// The cache version the key was written under.
    pub version: u32,
    /// The application's own key, which may contain `:` itself.
    pub key: &'a str,
}

/// Parse `prefix:version:key`; `None` unless the second segment is a decimal
/// version. The prefix may be empty (Django's default, `:1:key`).
///
/// ```
/// use cachepol_guest_sdk::keys::{Versioned, parse_versioned};
/// assert_eq!(parse_versioned(":1:user:7"), Some(Versioned { prefix: "", version: 1, key: "user:7" }));
/// assert_eq!(parse_versioned("quiz:today:1"), None);
/// ```
pub fn parse_versioned(key: &str) -> Option<Versioned<'_>> {
    let mut parts = key.splitn(3, SEPARATOR);
    let prefix = parts.next()?;
    let version = parts.next()?;
    let rest = parts.next()?;
    if version.is_empty() || !version.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(Versioned { prefix, version: version.parse().ok()?, key: rest })
}

/// A template with `{name}` placeholders; `{{` and `}}` stand for literal
/// braces (Redis Cluster hash tags use them).
///
/// Templates let an operator write key names in config
/// (`graph_data:{genre}`) while the policy fills in the values, derives its
/// grants ([`Template::wildcard`]) and recognises its keys in events
/// ([`Template::capture`]).
///
/// ```
/// use cachepol_guest_sdk::keys::Template;
///
/// let t = Template::parse("graph_data:{genre}").unwrap();
/// assert_eq!(t.render_key(&[("genre", "dance")]).unwrap(), "graph_data:dance");
/// assert_eq!(t.wildcard(), "graph_data:*");
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Template {
    source: String,
    parts: Vec<Part>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Part {
    Text(String),
    Var(String),
}

/// A template that cannot be parsed or filled. Its `Display` is written
/// for the operator whose config holds the template: return it from
/// `Policy::new` as the reason the load is refused.
///
/// ```
/// use cachepol_guest_sdk::keys::{Template, TemplateError};
///
/// let err = Template::parse("graph_data:{genre").unwrap_err();
/// assert!(matches!(err, TemplateError::Unbalanced { .. }));
/// assert!(err.to_string().contains("unbalanced brace"));
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TemplateError {
    /// A `{` without its `}`, or a stray `}`.
    Unbalanced {
        /// The template as written.
        template: String,
    },
    /// A `{}` or a name with characters other than `[A-Za-z0-9_-]`.
    BadName {
        /// The template as written.
        template: String,
        /// The offending placeholder name, without its braces.
        name: String,
    },
    /// A placeholder the caller has no value for.
    Unknown {
        /// The template as written.
        template: String,
        /// The placeholder that has no value.
        name: String,
    },
}

impl fmt::Display for TemplateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TemplateError::Unbalanced { template } => {
                write!(f, "template `{template}` has an unbalanced brace (write `{{{{` or `}}}}` for a literal one)")
            }
            TemplateError::BadName { template, name } => {
                write!(f, "template `{template}` has an invalid placeholder `{{{name}}}`")
            }
            TemplateError::Unknown { template, name } => {
                write!(f, "template `{template}` uses `{{{name}}}`, which has no value here")
            }
        }
    }
}

impl std::error::Error for TemplateError {}

impl Template {
    /// Parse `source`; fails on unbalanced braces and bad placeholder
    /// names, so a typo in config is caught at load, not at the first event.
    ///
    /// ```
    /// # use cachepol_guest_sdk::keys::Template;
    /// assert!(Template::parse("{{tag}}:{genre}").is_ok());
    /// assert!(Template::parse("a:{}").is_err());
    /// ```
    pub fn parse(source: &str) -> Result<Template, TemplateError> {
        let unbalanced = || TemplateError::Unbalanced { template: source.to_owned() };
        let mut parts = Vec::new();
        let mut text = String::new();
        let mut chars = source.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '{' if chars.peek() == Some(&'{') => {
                    chars.next();
                    text.push('{');
                }
                '}' if chars.peek() == Some(&'}') => {
                    chars.next();
                    text.push('}');
                }
                '{' => {
                    let mut name = String::new();
                    loop {
                        match chars.next() {
                            Some('}') => break,
                            Some(c) => name.push(c),
                            None => return Err(unbalanced()),
                        }
                    }
                    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
                        return Err(TemplateError::BadName { template: source.to_owned(), name });
                    }
                    if !text.is_empty() {
                        parts.push(Part::Text(std::mem::take(&mut text)));
                    }
                    parts.push(Part::Var(name));
                }
                '}' => return Err(unbalanced()),
                c => text.push(c),
            }
        }
        if !text.is_empty() {
            parts.push(Part::Text(text));
        }
        Ok(Template { source: source.to_owned(), parts })
    }

    /// The template as written, for messages.
    ///
    /// ```
    /// # use cachepol_guest_sdk::keys::Template;
    /// assert_eq!(Template::parse("a:{x}").unwrap().as_str(), "a:{x}");
    /// ```
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// The placeholder names, in order of appearance.
    ///
    /// ```
    /// # use cachepol_guest_sdk::keys::Template;
    /// let t = Template::parse("{service}:cache:{tenant}").unwrap();
    /// assert_eq!(t.placeholders().collect::<Vec<_>>(), ["service", "tenant"]);
    /// ```
    pub fn placeholders(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().filter_map(|p| match p {
            Part::Var(name) => Some(name.as_str()),
            Part::Text(_) => None,
        })
    }

    /// Check that every placeholder is one of `known`: at load, so that an
    /// operator's `{gerne}` is refused with its name rather than failing
    /// every event.
    ///
    /// ```
    /// # use cachepol_guest_sdk::keys::Template;
    /// let t = Template::parse("graph_data:{gerne}").unwrap();
    /// assert!(t.check_placeholders(&["genre"]).is_err());
    /// ```
    pub fn check_placeholders(&self, known: &[&str]) -> Result<(), TemplateError> {
        match self.placeholders().find(|name| !known.contains(name)) {
            Some(name) => Err(TemplateError::Unknown { template: self.source.clone(), name: name.to_owned() }),
            None => Ok(()),
        }
    }

    /// Fill in values verbatim: for exact key names, as passed to `get` or
    /// `del`, where no character is special.
    ///
    /// ```
    /// # use cachepol_guest_sdk::keys::Template;
    /// let t = Template::parse("graph_data:{genre}").unwrap();
    /// assert_eq!(t.render_key(&[("genre", "d*")]).unwrap(), "graph_data:d*");
    /// ```
    pub fn render_key(&self, values: &[(&str, &str)]) -> Result<String, TemplateError> {
        self.render(values, |v| v.to_owned())
    }

    /// Fill in values glob-escaped: the template's own `*` stays a wildcard,
    /// a `*` inside a value matches only itself.
    ///
    /// ```
    /// # use cachepol_guest_sdk::keys::Template;
    /// let t = Template::parse("service_playlist:{genre}:*").unwrap();
    /// assert_eq!(t.render_glob(&[("genre", "*")]).unwrap(), "service_playlist:\\*:*");
    /// ```
    pub fn render_glob(&self, values: &[(&str, &str)]) -> Result<String, TemplateError> {
        self.render(values, glob::escape)
    }

    /// Whether the rendered text is a glob with wildcards of its own (as
    /// opposed to one exact key): decides between `delete-matching` and
    /// `del`.
    ///
    /// ```
    /// # use cachepol_guest_sdk::keys::Template;
    /// assert!(Template::parse("service_playlist:{genre}:*").unwrap().is_pattern());
    /// assert!(!Template::parse("graph_data:{genre}").unwrap().is_pattern());
    /// ```
    pub fn is_pattern(&self) -> bool {
        self.parts.iter().any(|p| match p {
            Part::Text(t) => glob::Glob::new(t).literal().is_none(),
            Part::Var(_) => false,
        })
    }

    /// The glob of every key this template can produce: each placeholder
    /// becomes `*`. `last_updated:{genre}` gives `last_updated:*`, the
    /// pattern to subscribe to or to ask a grant for.
    ///
    /// ```
    /// # use cachepol_guest_sdk::keys::Template;
    /// assert_eq!(Template::parse("{service}:cache:{tenant}").unwrap().wildcard(), "*:cache:*");
    /// ```
    pub fn wildcard(&self) -> String {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Text(t) => out.push_str(t),
                Part::Var(_) => out.push('*'),
            }
        }
        out
    }

    /// The inverse of [`Template::render_key`]: the placeholder values that
    /// produce `key`, each non-empty, or `None` if the template cannot
    /// produce it. With several placeholders the earliest split wins.
    ///
    /// ```
    /// # use cachepol_guest_sdk::keys::Template;
    /// let trigger = Template::parse("last_updated:{genre}").unwrap();
    /// assert_eq!(trigger.capture("last_updated:dance"), Some(vec![("genre".into(), "dance".into())]));
    /// assert_eq!(trigger.capture("graph_data:dance"), None);
    /// ```
    pub fn capture(&self, key: &str) -> Option<Vec<(String, String)>> {
        fn go(parts: &[Part], rest: &str, out: &mut Vec<(String, String)>) -> bool {
            match parts.split_first() {
                None => rest.is_empty(),
                Some((Part::Text(t), tail)) => rest.strip_prefix(t.as_str()).is_some_and(|r| go(tail, r, out)),
                Some((Part::Var(name), tail)) => {
                    for (end, _) in rest.char_indices().skip(1).chain([(rest.len(), ' ')]) {
                        out.push((name.clone(), rest[..end].to_owned()));
                        if end > 0 && go(tail, &rest[end..], out) {
                            return true;
                        }
                        out.pop();
                    }
                    false
                }
            }
        }
        let mut out = Vec::new();
        go(&self.parts, key, &mut out).then_some(out)
    }

    fn render(&self, values: &[(&str, &str)], encode: impl Fn(&str) -> String) -> Result<String, TemplateError> {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Text(t) => out.push_str(t),
                Part::Var(name) => {
                    let value =
                        values.iter().find(|(k, _)| k == name).map(|(_, v)| *v).ok_or_else(|| {
                            TemplateError::Unknown { template: self.source.clone(), name: name.clone() }
                        })?;
                    out.push_str(&encode(value));
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn join_and_split() {
        assert_eq!(join(["music", "playlist", "acme", "42"]), "music:playlist:acme:42");
        assert_eq!(join(Vec::<String>::new()), "");
        assert_eq!(segments("a:b::c").collect::<Vec<_>>(), ["a", "b", "", "c"]);
    }

    #[test]
    fn django_versioned_keys_round_trip() {
        let k = versioned("bisk", 1, "user:7");
        assert_eq!(k, "bisk:1:user:7");
        assert_eq!(parse_versioned(&k), Some(Versioned { prefix: "bisk", version: 1, key: "user:7" }));
        assert_eq!(parse_versioned(":1:enforcer:x").map(|v| (v.prefix, v.version)), Some(("", 1)));
        assert_eq!(parse_versioned("bisk:v1:x"), None);
        assert_eq!(parse_versioned("bisk:1"), None);
        assert_eq!(parse_versioned("bisk::x"), None);
    }

    #[test]
    fn templates_render_keys_and_escaped_globs() {
        let t = Template::parse("service_playlist:{genre}:*").unwrap();
        assert!(t.is_pattern());
        assert_eq!(t.placeholders().collect::<Vec<_>>(), ["genre"]);
        assert_eq!(t.render_glob(&[("genre", "dance")]).unwrap(), "service_playlist:dance:*");
        assert_eq!(t.render_glob(&[("genre", "*")]).unwrap(), "service_playlist:\\*:*");
        let exact = Template::parse("graph_data:{genre}").unwrap();
        assert!(!exact.is_pattern());
        assert_eq!(exact.render_key(&[("genre", "d*")]).unwrap(), "graph_data:d*");
    }

    #[test]
    fn templates_give_their_wildcard_and_capture_values() {
        let t = Template::parse("last_updated:{genre}").unwrap();
        assert_eq!(t.wildcard(), "last_updated:*");
        assert_eq!(t.capture("last_updated:dance"), Some(vec![("genre".into(), "dance".into())]));
        assert_eq!(t.capture("last_updated:"), None, "values are never empty");
        assert_eq!(t.capture("other:dance"), None);
        let two = Template::parse("{service}:cache:{tenant}").unwrap();
        assert_eq!(two.wildcard(), "*:cache:*");
        assert_eq!(
            two.capture("music:cache:acme"),
            Some(vec![("service".into(), "music".into()), ("tenant".into(), "acme".into())])
        );
        assert_eq!(two.capture("music:cache:"), None);
        let unicode = Template::parse("g:{genre}!").unwrap();
        assert_eq!(unicode.capture("g:été!"), Some(vec![("genre".into(), "été".into())]));
    }

    #[test]
    fn template_errors_are_specific() {
        assert!(matches!(Template::parse("a:{genre"), Err(TemplateError::Unbalanced { .. })));
        assert!(matches!(Template::parse("a:}"), Err(TemplateError::Unbalanced { .. })));
        assert!(matches!(Template::parse("a:{}"), Err(TemplateError::BadName { .. })));
        assert!(matches!(Template::parse("a:{x y}"), Err(TemplateError::BadName { .. })));
        let t = Template::parse("{{tag}}:{genre}").unwrap();
        assert_eq!(t.render_key(&[("genre", "rock")]).unwrap(), "{tag}:rock");
        let err = t.render_key(&[]).unwrap_err();
        assert_eq!(err.to_string(), "template `{{tag}}:{genre}` uses `{genre}`, which has no value here");
        assert!(t.check_placeholders(&["genre"]).is_ok());
        assert!(t.check_placeholders(&["other"]).is_err());
    }
}
