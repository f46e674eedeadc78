//! Migrations: the contract's five tables, columns, types and keys; a second
//! run changes nothing.

use tickvault::db::Database;
use tickvault::records::{Conflict, FieldType, RecordType};

use crate::helpers::TestDatabase;

async fn schema_snapshot(pool: &sqlx::PgPool) -> Vec<(String, String, String, String)> {
    sqlx::query_as(
        "SELECT table_name::text, column_name::text, data_type::text, is_nullable::text \
         FROM information_schema.columns WHERE table_schema = 'public' AND table_name NOT LIKE '_sqlx%' \
         ORDER BY table_name, ordinal_position",
    )
    .fetch_all(pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn migrations_create_the_contract_tables_and_are_idempotent() {
    let db = TestDatabase::create().await;
    let mut config = tickvault::Config::default();
    config.database.url = tickvault::secret::SecretUrl::new(&db.url);
    let database = Database::connect_lazy(&config.database).unwrap();
    database.migrate().await.unwrap();
    let pool = db.pool().await;
    let first = schema_snapshot(&pool).await;

    for t in RecordType::ALL {
        let spec = t.spec();
        let columns: Vec<_> = first.iter().filter(|c| c.0 == spec.table).collect();
        let mut expected: Vec<(String, &str, &str)> = spec
            .fields
            .iter()
            .map(|f| {
                let ty = match f.ty {
                    FieldType::Symbol | FieldType::Side => "text",
                    FieldType::Timestamp => "timestamp with time zone",
                    FieldType::Positive | FieldType::NonNegative | FieldType::Finite => {
                        "double precision"
                    }
                    FieldType::PositiveInt | FieldType::NonNegativeInt => "bigint",
                };
                (
                    f.name.to_string(),
                    ty,
                    if f.required { "NO" } else { "YES" },
                )
            })
            .collect();
        if spec.conflict == Conflict::NewestWins {
            expected.push(("stream_seq".into(), "bigint", "YES"));
        }
        let actual: Vec<(String, &str, &str)> = columns
            .iter()
            .map(|c| (c.1.clone(), c.2.as_str(), c.3.as_str()))
            .collect();
        assert_eq!(actual, expected, "columns of {}", spec.table);

        let key: Vec<String> = sqlx::query_scalar(
            "SELECT a.attname::text FROM pg_constraint c \
             JOIN LATERAL unnest(c.conkey) WITH ORDINALITY AS k(attnum, n) ON true \
             JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.attnum \
             WHERE c.conrelid = $1::regclass AND c.contype = 'u' ORDER BY k.n",
        )
        .bind(spec.table)
        .fetch_all(&pool)
        .await
        .unwrap();
        assert_eq!(key, spec.key, "unique key of {}", spec.table);
    }

    let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations")
        .fetch_one(&pool)
        .await
        .unwrap();
    database.migrate().await.unwrap();
    assert_eq!(
        schema_snapshot(&pool).await,
        first,
        "a second run changes nothing"
    );
    let again: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(applied, again);
    database.pool.close().await;
}

#[tokio::test]
async fn tickvault_migrate_applies_the_migrations_from_the_command_line() {
    let db = TestDatabase::create().await;
    for _ in 0..2 {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_tickvault"))
            .arg("migrate")
            .env("DATABASE_URL", &db.url)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let pool = db.pool().await;
    let tables: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM information_schema.tables WHERE table_name = ANY($1)",
    )
    .bind(RecordType::ALL.map(|t| t.spec().table).to_vec())
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(tables, 5);
    pool.close().await;
}

/// Records an applied migration as sqlx does.
async fn record_applied(pool: &sqlx::PgPool, version: i64, description: &str) {
    sqlx::query(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
         VALUES ($1, $2, true, '\\x00', 0)",
    )
    .bind(version)
    .bind(description)
    .execute(pool)
    .await
    .unwrap();
}

#[tokio::test]
async fn a_database_migrated_by_the_previous_version_still_migrates() {
    let db = TestDatabase::create().await;
    let mut config = tickvault::Config::default();
    config.database.url = tickvault::secret::SecretUrl::new(&db.url);
    let database = Database::connect_lazy(&config.database).unwrap();
    database.migrate().await.unwrap();
    let pool = db.pool().await;
    // The previous version's one-shot TimescaleDB migration, now retired.
    record_applied(&pool, 20261126000002, "timescaledb").await;

    let storage = database.migrate().await.unwrap();
    assert_eq!(storage, tickvault::db::Storage::Postgresql);
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_tickvault"))
        .arg("migrate")
        .env("DATABASE_URL", &db.url)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );

    // A migration no tickvault this old knows is still refused.
    record_applied(&pool, 20991231000000, "from the future").await;
    let error = database.migrate().await.unwrap_err().to_string();
    assert!(
        error.contains("20991231000000") && error.contains("newer tickvault"),
        "{error}"
    );
    pool.close().await;
    database.pool.close().await;
}
