<#
.SYNOPSIS
Escalation drill: posts one synthetic alert per severity (critical, high,
medium, low) to Alertmanager, waits until each has reached the mailbox of
its receiver, and writes the evidence to a JSON file.

.DESCRIPTION
The PowerShell twin of scripts/security/alert_drill.sh; same environment,
same evidence file, same exit status.

Environment (defaults fit docker-compose.observability.yml):
  ALERTMANAGER_URL         http://127.0.0.1:9093
  MAILPIT_URL              http://127.0.0.1:8025  (Mailpit's /api/v1/messages)
  DRILL_EVIDENCE           evidence file; -Out wins (alert-drill-<drill id>.json)
  DRILL_DEADLINE_S         seconds to wait for every mail; -DeadlineSeconds wins (120)
  ALERT_EMAIL_CRITICAL_TO  mailbox of oncall-critical  (oncall-critical@pqmsg.test)
  ALERT_EMAIL_HIGH_TO      mailbox of oncall-high      (oncall-high@pqmsg.test)
  ALERT_EMAIL_STANDARD_TO  mailbox of oncall-standard  (oncall-standard@pqmsg.test)

Exit status: 0 every alert was delivered, 1 some mail is missing at the
deadline, 2 Alertmanager refused the alerts. The drill alerts carry
drill="true" and service="pqmsg-drill": they never inhibit real alerts, and
the script resolves them when it ends.

.EXAMPLE
./scripts/security/alert_drill.ps1 -Out drill-evidence.json -DeadlineSeconds 120
#>
[CmdletBinding()]
param(
    [string]$Out = $env:DRILL_EVIDENCE,
    [int]$DeadlineSeconds = $(if ($env:DRILL_DEADLINE_S) { [int]$env:DRILL_DEADLINE_S } else { 120 })
)

Set-StrictMode -Version Latest
$ErrorActionPreference = 'Stop'
$PollSeconds = 2
$HttpTimeoutSeconds = 10

function Get-Setting([string]$Name, [string]$Default) {
    $value = [Environment]::GetEnvironmentVariable($Name)
    if ([string]::IsNullOrEmpty($value)) { return $Default }
    return $value
}

function Format-Stamp([DateTime]$Moment) {
    return $Moment.ToUniversalTime().ToString("yyyy-MM-dd'T'HH:mm:ss.fff'Z'")
}

$AlertmanagerUrl = Get-Setting 'ALERTMANAGER_URL' 'http://127.0.0.1:9093'
$MailpitUrl = Get-Setting 'MAILPIT_URL' 'http://127.0.0.1:8025'
$Severities = [ordered]@{
    critical = @{ Receiver = 'oncall-critical'; To = (Get-Setting 'ALERT_EMAIL_CRITICAL_TO' 'oncall-critical@pqmsg.test') }
    high     = @{ Receiver = 'oncall-high'; To = (Get-Setting 'ALERT_EMAIL_HIGH_TO' 'oncall-high@pqmsg.test') }
    medium   = @{ Receiver = 'oncall-standard'; To = (Get-Setting 'ALERT_EMAIL_STANDARD_TO' 'oncall-standard@pqmsg.test') }
    low      = @{ Receiver = 'oncall-standard'; To = (Get-Setting 'ALERT_EMAIL_STANDARD_TO' 'oncall-standard@pqmsg.test') }
}

$Started = [DateTime]::UtcNow
$RandomHex = -join (1..4 | ForEach-Object { '{0:x2}' -f (Get-Random -Maximum 256) })
$DrillId = $Started.ToString("yyyyMMdd'T'HHmmss'Z'") + "-$RandomHex"
$PostedAt = Format-Stamp $Started
if (-not $Out) { $Out = "alert-drill-$DrillId.json" }

function New-DrillAlerts([bool]$Resolve) {
    # A fresh alert name per run: alerts of an earlier run that are still
    # resolving can never share a notification group with this run's.
    $endsAt = if ($Resolve) { [DateTime]::UtcNow } else { [DateTime]::UtcNow.AddSeconds($DeadlineSeconds + 300) }
    foreach ($severity in $Severities.Keys) {
        [ordered]@{
            labels      = [ordered]@{
                alertname = "PqmsgDrill-$DrillId"; severity = $severity; service = 'pqmsg-drill'
                drill = 'true'; drill_id = "$DrillId-$severity"
            }
            annotations = [ordered]@{
                summary     = "Escalation drill ($severity): no action needed"
                description = 'Synthetic alert of scripts/security/alert_drill.ps1.'
            }
            startsAt    = $PostedAt
            endsAt      = Format-Stamp $endsAt
        }
    }
}

function Send-DrillAlerts([bool]$Resolve) {
    $body = ConvertTo-Json -InputObject @(New-DrillAlerts $Resolve) -Depth 5
    Invoke-RestMethod -Method Post -Uri "$AlertmanagerUrl/api/v2/alerts" -ContentType 'application/json' `
        -Body $body -TimeoutSec $HttpTimeoutSeconds | Out-Null
}

function Get-OrNull([string]$Uri) {
    try { return Invoke-RestMethod -Uri $Uri -TimeoutSec $HttpTimeoutSeconds }
    catch { return $null }
}

function Get-Addresses([string]$Value) {
    return @($Value -split ',' | ForEach-Object { $_.Trim() } | Where-Object { $_ } |
        ForEach-Object { ($_ -split '<')[-1].TrimEnd('>').ToLowerInvariant() })
}

function Test-Recipients($Message, [string[]]$Wanted) {
    if (-not $Message.To) { return $false }
    $have = @($Message.To | ForEach-Object { "$($_.Address)".ToLowerInvariant() })
    foreach ($address in $Wanted) { if ($have -notcontains $address) { return $false } }
    return $true
}

function Find-Mail($Messages, [string]$Token, [string[]]$Wanted) {
    $hits = @($Messages | Where-Object { "$($_.Subject)".Contains($Token) -and (Test-Recipients $_ $Wanted) })
    if ($hits.Count -eq 0) { return $null }
    return $hits | Sort-Object -Property Created | Select-Object -First 1
}

function Get-AlertmanagerReceivers($AmAlerts, [string]$Token) {
    foreach ($alert in @($AmAlerts)) {
        if ($alert -and $alert.labels.drill_id -eq $Token) { return @($alert.receivers | ForEach-Object { $_.name }) }
    }
    return $null
}

function Get-Results($Listing, $AmAlerts) {
    $messages = if ($Listing -and $Listing.messages) { @($Listing.messages) } else { @() }
    foreach ($severity in $Severities.Keys) {
        $token = "$DrillId-$severity"
        $target = $Severities[$severity]
        $mail = Find-Mail $messages $token (Get-Addresses $target.To)
        [ordered]@{
            severity = $severity; drill_id = $token; receiver = $target.Receiver; recipient = $target.To
            alertmanager_receivers = (Get-AlertmanagerReceivers $AmAlerts $token)
            delivered = [bool]$mail
            mailbox_id = if ($mail) { $mail.ID } else { $null }
            message_id = if ($mail) { $mail.MessageID } else { $null }
            subject = if ($mail) { $mail.Subject } else { $null }
            received_at = if ($mail) { $mail.Created } else { $null }
        }
    }
}

function Write-Evidence($Results, [bool]$Passed) {
    $evidence = [ordered]@{
        drill_id = $DrillId; result = $(if ($Passed) { 'pass' } else { 'fail' })
        alertmanager_url = $AlertmanagerUrl; mailpit_url = $MailpitUrl
        posted_at = $PostedAt; finished_at = Format-Stamp ([DateTime]::UtcNow)
        deadline_s = $DeadlineSeconds; alerts = @($Results)
    }
    ConvertTo-Json -InputObject $evidence -Depth 6 | Set-Content -Path $Out -Encoding utf8
    foreach ($r in $Results) {
        $state = if ($r.delivered) { 'delivered' } else { 'MISSING' }
        Write-Host ('{0,8}  {1,-9}  {2,-15}  {3}  {4}  {5}' -f $r.severity, $state, $r.receiver,
            $r.recipient, $(if ($r.received_at) { $r.received_at } else { '-' }),
            $(if ($r.message_id) { $r.message_id } else { '-' }))
    }
}

Write-Host "alert_drill: $DrillId -> $AlertmanagerUrl, mailbox $MailpitUrl, deadline ${DeadlineSeconds}s"
try { Send-DrillAlerts $false }
catch { Write-Error "alert_drill: Alertmanager refused the drill alerts: $_" -ErrorAction Continue; exit 2 }

$filter = [Uri]::EscapeDataString("drill_id=~`"$DrillId-.*`"")
$clock = [Diagnostics.Stopwatch]::StartNew()
try {
    while ($true) {
        $listing = Get-OrNull "$MailpitUrl/api/v1/messages?limit=200"
        $amAlerts = Get-OrNull "$AlertmanagerUrl/api/v2/alerts?filter=$filter"
        $results = @(Get-Results $listing $amAlerts)
        $passed = @($results | Where-Object { -not $_.delivered }).Count -eq 0
        if ($passed) {
            Write-Evidence $results $true
            Write-Host "alert_drill: every alert reached its receiver; evidence in $Out"
            exit 0
        }
        if ($clock.Elapsed.TotalSeconds -ge $DeadlineSeconds) {
            Write-Evidence $results $false
            Write-Error "alert_drill: FAILED, mail missing after ${DeadlineSeconds}s; evidence in $Out" -ErrorAction Continue
            exit 1
        }
        Start-Sleep -Seconds $PollSeconds
    }
}
finally {
    try { Send-DrillAlerts $true } catch { Write-Warning "alert_drill: could not resolve the drill alerts: $_" }
}
