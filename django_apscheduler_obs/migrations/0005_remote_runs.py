"""Runs handed to a worker engine: the worker, queue wait, liveness and a report flag.

Every new column is nullable, so no database rewrites the execution table to add them (SQLite
copies the whole table for a NOT NULL column with a default).
"""

from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('django_apscheduler_obs', '0004_drop_redundant_job_index'),
    ]

    operations = [
        migrations.AddField(
            model_name='djangojobexecution',
            name='enqueued_at',
            field=models.DateTimeField(blank=True, help_text='When the scheduler claimed it and enqueued it.', null=True),
        ),
        migrations.AddField(
            model_name='djangojobexecution',
            name='picked_up_at',
            field=models.DateTimeField(blank=True, null=True),
        ),
        migrations.AddField(
            model_name='djangojobexecution',
            name='queue_wait',
            field=models.FloatField(blank=True, help_text='Picked up - enqueued, in seconds.', null=True),
        ),
        migrations.AddField(
            model_name='djangojobexecution',
            name='report_pending',
            field=models.BooleanField(blank=True, editable=False, null=True),
        ),
        migrations.AddField(
            model_name='djangojobexecution',
            name='worker',
            field=models.CharField(blank=True, help_text='The worker that ran it.', max_length=200, null=True),
        ),
        migrations.AddField(
            model_name='djangojobexecution',
            name='job_state',
            field=models.BinaryField(blank=True, editable=False, null=True),
        ),
        migrations.AddField(
            model_name='djangojobexecution',
            name='worker_seen',
            field=models.DateTimeField(blank=True, null=True),
        ),
        migrations.AlterField(
            model_name='djangojobexecution',
            name='status',
            field=models.CharField(choices=[('Started execution', 'Started execution'), ('Executed', 'Executed'), ('Error!', 'Error!'), ('Missed!', 'Missed!'), ('Max instances!', 'Max instances!'), ('Abandoned', 'Abandoned'), ('Queued', 'Queued'), ('Running on worker', 'Running on worker'), ('Lost', 'Lost')], help_text='The current status of this job execution.', max_length=50),
        ),
        migrations.AddIndex(
            model_name='djangojobexecution',
            index=models.Index(fields=['report_pending'], name='dao_exec_report_pending'),
        ),
    ]
