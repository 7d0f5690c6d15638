"""Sign the job state of rows written without a signature (django-apscheduler 0.7, or before
``APSCHEDULER_SIGN_JOB_STATE``), so the job store keeps restoring them.

Only unsigned rows change. A signed row is left as it is, including one whose signature does
not verify: signing it again would turn a tampered row into a trusted one. Rows present at
upgrade time are trusted as 0.7 trusted them (it unpickled them unchecked). Reversing is a
no-op: signed rows stay readable by this version.
"""

from django.db import migrations


def sign_unsigned_rows(apps, schema_editor):
    from django_apscheduler_obs import signing
    from django_apscheduler_obs.conf import conf

    if not conf.SIGN_JOB_STATE:
        return
    DjangoJob = apps.get_model("django_apscheduler_obs", "DjangoJob")
    db = schema_editor.connection.alias
    unsigned = [
        (job_id, bytes(state))
        for job_id, state in DjangoJob.objects.using(db).values_list("id", "job_state").iterator()
        if not signing.is_signed(bytes(state))
    ]
    for job_id, state in unsigned:
        DjangoJob.objects.using(db).filter(id=job_id).update(job_state=signing.resign(state))


class Migration(migrations.Migration):

    dependencies = [
        ("django_apscheduler_obs", "0002_runrequest"),
    ]

    operations = [
        migrations.RunPython(sign_unsigned_rows, migrations.RunPython.noop, elidable=True),
    ]
