"""genq core: settings, database, models and job states shared by every other package."""
