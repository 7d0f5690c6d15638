"""Drop the single-column index on ``DjangoJobExecution.job_id``.

The unique ``(job_id, run_time)`` constraint and the ``(job, status, run_time)`` index both
lead with ``job_id``, so the third index served no query and cost every claim and every
cleanup batch. Only the index is dropped: Django's ``AlterField`` would copy the whole table
on SQLite to do it, which on a large history takes minutes.
"""

from django.db import migrations, models


def _job_id_indexes(schema_editor, model):
    return schema_editor._constraint_names(model, column_names=["job_id"], index=True)


def drop_index(apps, schema_editor):
    model = apps.get_model("django_apscheduler_obs", "DjangoJobExecution")
    for name in _job_id_indexes(schema_editor, model):
        schema_editor.execute(schema_editor._delete_index_sql(model, name))


def create_index(apps, schema_editor):
    model = apps.get_model("django_apscheduler_obs", "DjangoJobExecution")
    if not _job_id_indexes(schema_editor, model):
        field = model._meta.get_field("job")
        schema_editor.execute(schema_editor._create_index_sql(model, fields=[field]))


class Migration(migrations.Migration):
    dependencies = [
        ("django_apscheduler_obs", "0003_sign_job_state"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.AlterField(
                    model_name="djangojobexecution",
                    name="job",
                    field=models.ForeignKey(
                        db_constraint=False,
                        db_index=False,
                        help_text="The job that this execution relates to.",
                        on_delete=models.deletion.DO_NOTHING,
                        to="django_apscheduler_obs.djangojob",
                    ),
                ),
            ],
            database_operations=[migrations.RunPython(drop_index, create_index)],
        ),
    ]
