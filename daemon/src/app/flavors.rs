//! Flavors: what a node boots. Created once by name, replaced whole, deleted when no
//! node uses them.

use super::{App, AppError};
use crate::core::model::{Action, Flavor, NewEvent};
use crate::core::validate;

impl App {
    /// Creates a flavor; `AlreadyExists` when the name is taken.
    pub async fn flavor_create(&self, actor: &str, flavor: Flavor) -> Result<Flavor, AppError> {
        validate::check_flavor(&flavor)?;
        if self.store.flavor_get(&flavor.name).await?.is_some() {
            return Err(AppError::FlavorExists { name: flavor.name });
        }
        self.flavor_save(actor, &flavor, Action::FlavorCreate)
            .await?;
        Ok(flavor)
    }

    /// Replaces (or creates) the flavor `name`; the body's name must match.
    pub async fn flavor_replace(
        &self,
        actor: &str,
        name: &str,
        flavor: Flavor,
    ) -> Result<Flavor, AppError> {
        if flavor.name != name {
            return Err(validate::FieldError {
                field: "name".into(),
                problem: format!("{:?} does not match the path's {name:?}", flavor.name),
            }
            .into());
        }
        validate::check_flavor(&flavor)?;
        self.flavor_save(actor, &flavor, Action::FlavorReplace)
            .await?;
        Ok(flavor)
    }

    async fn flavor_save(
        &self,
        actor: &str,
        flavor: &Flavor,
        action: Action,
    ) -> Result<(), AppError> {
        let now = self.now_ms();
        self.store.flavor_put(flavor, now).await?;
        let event = NewEvent::global(now, actor, action, format!("flavor {}", flavor.name));
        self.store.event_append(&[event]).await?;
        Ok(())
    }

    pub async fn flavor_delete(&self, actor: &str, name: &str) -> Result<(), AppError> {
        self.store.flavor_delete(name).await?;
        let event = NewEvent::global(
            self.now_ms(),
            actor,
            Action::FlavorDelete,
            format!("flavor {name}"),
        );
        self.store.event_append(&[event]).await?;
        Ok(())
    }
}
