//! Flavors: what a node boots. Created once by name, replaced whole, deleted when no
//! node uses them. Each write carries its audit event in the same transaction.

use super::{App, AppError};
use crate::core::model::{Action, Flavor, NewEvent};
use crate::core::validate;
use crate::store::StoreError;

impl App {
    /// Creates a flavor; `FlavorExists` when the name is taken — decided by the
    /// database, so of two concurrent creates exactly one succeeds.
    pub async fn flavor_create(&self, actor: &str, flavor: Flavor) -> Result<Flavor, AppError> {
        validate::check_flavor(&flavor)?;
        let now = self.now_ms();
        let event = NewEvent::global(
            now,
            actor,
            Action::FlavorCreate,
            format!("flavor {}", flavor.name),
        );
        match self.store.flavor_create(&flavor, now, &[event]).await {
            Ok(()) => Ok(flavor),
            Err(StoreError::AlreadyExists { .. }) => {
                Err(AppError::FlavorExists { name: flavor.name })
            }
            Err(error) => Err(error.into()),
        }
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
        let now = self.now_ms();
        let event = NewEvent::global(now, actor, Action::FlavorReplace, format!("flavor {name}"));
        self.store.flavor_put(&flavor, now, &[event]).await?;
        Ok(flavor)
    }

    /// Deletes a flavor no node uses.
    pub async fn flavor_delete(&self, actor: &str, name: &str) -> Result<(), AppError> {
        let event = NewEvent::global(
            self.now_ms(),
            actor,
            Action::FlavorDelete,
            format!("flavor {name}"),
        );
        Ok(self.store.flavor_delete(name, &[event]).await?)
    }
}
