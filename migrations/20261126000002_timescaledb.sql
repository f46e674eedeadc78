-- On TimescaleDB, turn the five tables into hypertables with compression
-- enabled; on plain PostgreSQL this does nothing. The compression and
-- retention policies' intervals are settings, applied at start-up
-- (database.compress_after, database.retention).
DO $$
DECLARE
    t record;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb')
       OR current_setting('shared_preload_libraries', true) NOT LIKE '%timescaledb%' THEN
        RAISE NOTICE 'timescaledb is not available: keeping plain tables';
        RETURN;
    END IF;
    CREATE EXTENSION IF NOT EXISTS timescaledb;
    FOR t IN SELECT * FROM (VALUES
        ('tick_data', 'symbol', '1 day'),
        ('candles_1m', 'symbol', '7 days'),
        ('foreign_flow', 'symbol', '7 days'),
        ('index_snapshots', 'index_name', '7 days'),
        ('derivatives', 'contract', '7 days')) AS v(name, segment_by, chunk)
    LOOP
        EXECUTE format(
            'SELECT create_hypertable(%L, ''timestamp'', chunk_time_interval => %L::interval, if_not_exists => true, migrate_data => true)',
            t.name, t.chunk);
        EXECUTE format(
            'ALTER TABLE %I SET (timescaledb.compress, timescaledb.compress_segmentby = %L, timescaledb.compress_orderby = %L)',
            t.name, t.segment_by, '"timestamp" DESC');
    END LOOP;
END
$$;
