//! genre-invalidation: when a genre's data changes, drop every cache entry
//! derived from it.
//!
//! The runbook it replaces: "when genre `dance` updates, delete
//! `graph_data:dance`, `playlist_data:dance`, `header_art:dance` and
//! `service_playlist:dance:*`". A genre changes either through a deploy hook
//! tagged `genre=dance` (several tags, several genres) or through the app
//! writing `last_updated:dance`.
//!
//! Keyspace notifications can be lost (a daemon restart, a cut
//! subscription, notifications off for a moment, a queue overflow), and the
//! host answers each gap with a sweep. A [`TriggerLedger`] remembers, in the
//! policy's own state keys, the `last_updated:<genre>` value it last acted
//! on; every sweep invalidates the genres whose trigger changed since, and
//! only those. The first sweep on a cache it has no record of records what
//! it finds as the baseline and invalidates nothing.
//!
//! Key names come from config as templates with a `{genre}` placeholder; a
//! template with its own wildcard is cleared with `delete-matching`, the
//! others are deleted in one `del`. Genre names are glob-escaped, so a genre
//! called `*` deletes `service_playlist:\*:*`, not every playlist. The grants
//! it asks for are exactly the templates' wildcards.

use cachepol_guest_sdk::prelude::*;
use cachepol_guest_sdk::{info, warn};

/// Operator settings; every field has the runbook's default.
#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Keys to drop for a genre: templates with `{genre}`.
    pub keys: Vec<String>,
    /// A write to this key means "the genre changed".
    pub trigger: String,
    /// The keyspace events on `trigger` that count as a write.
    pub trigger_ops: Vec<String>,
    /// The deploy-hook tag that names a genre.
    pub tag: String,
    /// Services whose deploy hooks are read (`*`: all).
    pub services: Vec<String>,
    /// Where the trigger ledger keeps what the policy last acted on (its
    /// own keys, outside the daemon's `cachepol:`).
    pub state_prefix: String,
    /// Also sweep this often, in seconds (off by default): a bound on how
    /// long a trigger lost without the daemon noticing stays unreconciled.
    pub sweep_every_secs: Option<u32>,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            keys: vec![
                "graph_data:{genre}".into(),
                "playlist_data:{genre}".into(),
                "header_art:{genre}".into(),
                "service_playlist:{genre}:*".into(),
            ],
            trigger: "last_updated:{genre}".into(),
            trigger_ops: vec!["set".into()],
            tag: "genre".into(),
            services: vec!["*".into()],
            state_prefix: "cachepol-state:genre-invalidation:".into(),
            sweep_every_secs: None,
        }
    }
}

pub struct GenreInvalidation {
    keys: Vec<Template>,
    trigger: Template,
    /// What it last acted on per trigger key; a trigger that disappears is
    /// a change too when `trigger_ops` has a removal.
    ledger: TriggerLedger,
    config: Config,
}

/// Keyspace events of a key going away.
const REMOVAL_OPS: &[&str] = &["del", "expired", "evicted"];

fn genre_template(source: &str) -> Result<Template, String> {
    let template = Template::parse(source).map_err(|e| e.to_string())?;
    template.check_placeholders(&["genre"]).map_err(|e| e.to_string())?;
    if template.placeholders().count() != 1 {
        return Err(format!("template `{source}` must contain `{{genre}}` exactly once"));
    }
    Ok(template)
}

impl GenreInvalidation {
    /// Delete every key of `genre`; returns how many existed.
    fn invalidate(&self, genre: &str) -> Result<u64, Error> {
        let values = [("genre", genre)];
        let mut exact = Vec::new();
        let mut deleted = 0;
        for template in &self.keys {
            if template.is_pattern() {
                let pattern = template.render_glob(&values).map_err(|e| Error::policy(e.to_string()))?;
                deleted += redis::delete_matching(&pattern)?;
            } else {
                exact.push(template.render_key(&values).map_err(|e| Error::policy(e.to_string()))?);
            }
        }
        if !exact.is_empty() {
            deleted += redis::del(&exact)?;
        }
        info!("genre `{genre}` changed: {deleted} cache keys deleted");
        Ok(deleted)
    }

    /// The genre a trigger key names.
    fn genre_of(&self, key: &str) -> Option<String> {
        self.trigger.capture(key).and_then(|values| values.into_iter().next()).map(|(_, genre)| genre)
    }

    /// Invalidate `genre` because a live event or a hook says it changed.
    /// Its trigger `key` is read first and recorded after (the ledger), so
    /// the next sweep does not invalidate it again for the same change.
    fn invalidate_live(&self, genre: &str, key: &str) -> Result<Option<String>, Error> {
        if genre.is_empty() {
            warn!("ignoring an empty genre name");
            return Ok(None);
        }
        let deleted = self.ledger.act_on(key, |_| self.invalidate(genre))?;
        Ok(Some(format!("{genre}: {deleted} deleted")))
    }
}

impl Policy for GenreInvalidation {
    type Config = Config;

    fn new(config: Config) -> Result<Self, String> {
        if config.keys.is_empty() {
            return Err("`keys` is empty: nothing to invalidate".into());
        }
        let keys = config.keys.iter().map(|k| genre_template(k)).collect::<Result<_, _>>()?;
        let trigger = genre_template(&config.trigger)?;
        let removals = config.trigger_ops.iter().any(|op| REMOVAL_OPS.contains(&op.as_str()));
        let ledger = TriggerLedger::new(&trigger.wildcard(), &config.state_prefix)
            .map_err(|e| e.to_string())?
            .watching(if removals { Watch::WritesAndRemovals } else { Watch::Writes });
        Ok(GenreInvalidation { keys, trigger, ledger, config })
    }

    fn manifest(&self) -> Manifest {
        let trigger = self.trigger.wildcard();
        let ops: Vec<&str> = self.config.trigger_ops.iter().map(String::as_str).collect();
        let services: Vec<&str> = self.config.services.iter().map(String::as_str).collect();
        let mut manifest = Manifest::new("genre-invalidation", env!("CARGO_PKG_VERSION"))
            .description("drop a genre's cached graph, playlists and art when the genre changes")
            .on_deploys(&services)
            .on_keys(&ops, &[&trigger])
            .ledger(&self.ledger);
        if let Some(secs) = self.config.sweep_every_secs {
            manifest = manifest.sweep_every(secs);
        }
        for template in &self.keys {
            manifest = manifest.grant(&template.wildcard(), KeyOps::DELETE);
        }
        manifest
    }

    fn on_deploy(&mut self, event: DeployEvent) -> Result<Outcome, Error> {
        let mut notes = Vec::new();
        for genre in event.tags_named(&self.config.tag) {
            let key = self.trigger.render_key(&[("genre", genre)]).map_err(|e| Error::policy(e.to_string()))?;
            notes.extend(self.invalidate_live(genre, &key)?);
        }
        Ok(Outcome::done().with_note(notes.join(", ")))
    }

    fn on_key(&mut self, event: KeyEvent) -> Result<Outcome, Error> {
        let Some(genre) = self.genre_of(&event.key) else { return Ok(Outcome::done()) };
        let note = self.invalidate_live(&genre, &event.key)?;
        Ok(Outcome::done().with_note(note.unwrap_or_default()))
    }

    fn on_sweep(&mut self, reason: SweepReason) -> Result<Outcome, Error> {
        let mut invalidated = Vec::new();
        // Triggers that went come only when a removal is one of the events
        // the policy reacts to (the ledger watches removals then).
        let report = self.ledger.sweep(|trigger| {
            match self.genre_of(&trigger.key) {
                Some(genre) if !genre.is_empty() => {
                    self.invalidate(&genre)?;
                    invalidated.push(genre);
                }
                _ => {}
            }
            Ok(())
        })?;
        if report.baseline && report.recorded > 0 {
            info!(
                "sweep ({}): first sweep of this cache: {} `{}` keys recorded as they are, no genre invalidated",
                reason.name(),
                report.recorded,
                self.ledger.triggers()
            );
        }
        if !invalidated.is_empty() {
            info!("sweep ({}): changed while unobserved, invalidated: {}", reason.name(), invalidated.join(", "));
        }
        if !report.finished {
            info!("sweep ({}): trigger walk cut short by its limits; it goes on at the next sweep", reason.name());
        }
        Ok(Outcome::done().with_note(report.to_string()))
    }
}

export_policy!(GenreInvalidation);
