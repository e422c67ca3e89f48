//! A provider built against a future, incompatible WIT (`wasd:provider@9.0.0`): the
//! host must refuse it with a clear error.

wit_bindgen::generate!({
    inline: "
        package wasd:provider@9.0.0;
        interface resolver {
            resolve: func(service: string) -> list<string>;
        }
        world provider { export resolver; }
    ",
    world: "provider",
});

struct Future;

impl exports::wasd::provider::resolver::Guest for Future {
    fn resolve(service: String) -> Vec<String> {
        vec![service]
    }
}

export!(Future);
