-- One PostgreSQL for the stack, one database per server. Runs once, when the postgres container starts on an
-- empty data volume (/docker-entrypoint-initdb.d); the owner is POSTGRES_USER.
CREATE DATABASE prefect;
CREATE DATABASE mlflow;
