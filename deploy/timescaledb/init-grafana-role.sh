#!/bin/sh
# Runs once, when the database is first created (docker-entrypoint-initdb.d):
# a read-only role for Grafana's market-data dashboard, its password from the
# grafana_db_password secret. Tables tickvault creates later are readable by it.
set -eu
password=$(cat /run/secrets/grafana_db_password)
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
    --set=password="$password" <<'SQL'
CREATE ROLE grafana LOGIN PASSWORD :'password';
GRANT CONNECT ON DATABASE market TO grafana;
GRANT USAGE ON SCHEMA public TO grafana;
ALTER DEFAULT PRIVILEGES FOR ROLE tickvault IN SCHEMA public GRANT SELECT ON TABLES TO grafana;
ALTER ROLE grafana SET default_transaction_read_only = on;
ALTER ROLE grafana SET statement_timeout = '30s';
SQL
